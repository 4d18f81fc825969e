# One-shot reproduction on GPUs (README "Docker"):
#   docker build -t stella .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD/data:/data" -v "$PWD/runs:/runs" stella \
#       reproduce vggsound-retrieval
# The base image pins CUDA, cuDNN and PyTorch; pip keeps its torch because it satisfies pyproject's range.
# tensorboard (the [tb] extra, pinned here) for `train.log_to: tensorboard` (README "Watching a run").
# scripts/docker_check.sh (make docker-check) builds this file unchanged on a local stand-in: --build-arg BASE_IMAGE.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package, with its recipes inside it, is installed from a copy of the sources that is then removed.
COPY pyproject.toml README.md /tmp/stella/
COPY stella_cli /tmp/stella/stella_cli
COPY recipes /tmp/stella/recipes
COPY scripts/docker-entrypoint.sh /usr/local/bin/stella-entrypoint
WORKDIR /opt/stella
RUN pip install --no-cache-dir /tmp/stella tensorboard==2.21.0 \
 && rm -rf /tmp/stella \
 && useradd --create-home --uid 1000 stella \
 && chmod 1777 /home/stella \
 && mkdir -p /data /runs \
 && ln -s /data /opt/stella/data \
 && ln -s /runs /opt/stella/runs \
 && ln -s /runs/reports /opt/stella/reports \
 && chown 1000:1000 /data /runs
# HOME is writable by any uid that `docker run --user` picks (matplotlib's and CUDA's caches live there).
ENV HOME=/home/stella

# Recipes name data/<dataset> and runs/<name> relative to /opt/stella: both are links into the mounted folders, and
# `stella report` writes to reports/, a link to runs/reports.
VOLUME ["/data", "/runs"]
USER 1000:1000
ENTRYPOINT ["/usr/local/bin/stella-entrypoint"]
CMD ["--help"]
