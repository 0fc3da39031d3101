# A GPU worker: CUDA PyTorch base, lens-server on top. One container per GPU (compose
# reserves one device for each), models loaded once and kept resident.
ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${TORCH_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/hf-cache

WORKDIR /opt/lens-server
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
# torch comes with the base image (the [worker] extra accepts it); the rest from PyPI, with
# accelerate for models spread over several GPUs (device_map).
RUN pip install ".[worker,multi-gpu]" \
    && useradd --create-home --uid 10001 --user-group lens \
    && mkdir -p /data /hf-cache \
    && chown lens:lens /data /hf-cache

USER lens
ENTRYPOINT ["lens"]
CMD ["worker"]
