# One-shot reproduction on GPUs (README "Docker"):
#   docker build -t stella .
#   docker run --gpus all -v DATA:/data -v RUNS:/runs stella reproduce vggsound-retrieval
#   docker run -v RUNS:/runs stella reproduce          # the synthetic table, on the CPU
# The base image pins CUDA, cuDNN and PyTorch; pip keeps its torch because it satisfies pyproject's range.
# tensorboard (the [tb] extra, pinned here) for `train.log_to: tensorboard` (README "Watching a run").
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/stella
COPY pyproject.toml README.md ./
COPY stella_cli ./stella_cli
COPY recipes ./recipes
RUN pip install --no-cache-dir . tensorboard==2.21.0 \
 && useradd --create-home --uid 1000 stella \
 && mkdir -p /data /runs \
 && ln -s /data /opt/stella/data \
 && ln -s /runs /opt/stella/runs \
 && chown 1000:1000 /data /runs

# Recipes name data/<dataset> and runs/<name> relative to /opt/stella: both are links into the volumes.
VOLUME ["/data", "/runs"]
USER 1000:1000
ENTRYPOINT ["stella"]
CMD ["--help"]
