# A local stand-in for the Dockerfile's base image (pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime) where no registry
# serves it; scripts/docker_check.sh builds it, with the folder holding the downloaded wheels as the context. It has the
# real base's layout: Python 3.11 in /opt/conda first on PATH, torch installed by pip, root, WORKDIR /workspace; but
# Debian bookworm's Python, a CPU torch (TORCH) and no CUDA. pip in every image built on it installs offline from
# /wheels, so the project's Dockerfile builds unchanged but for BASE_IMAGE.
ARG ROOTFS=stella-standin-rootfs:bookworm
FROM ${ROOTFS}
ARG TORCH=torch==2.13.0
COPY wheels /wheels
# torch's wheel is then deleted: an image built on this base cannot replace the base's torch without failing
RUN python3 -m venv /opt/conda \
 && /opt/conda/bin/pip install --no-cache-dir --no-index --find-links /wheels "${TORCH}" \
 && rm /wheels/torch-*.whl
ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels
WORKDIR /workspace
