# The HTTP API: validation, authentication, queues, results. No torch: a small image
# that any host can run; the GPU work happens in the worker image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/lens-server
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
# The project's own [server] extra: the client's base plus the API's dependencies, no torch,
# no transformers and no bundled Redis server (compose runs its own).
RUN pip install ".[server]" \
    && useradd --create-home --uid 10001 --user-group lens \
    && mkdir -p /data \
    && chown lens:lens /data

USER lens
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
ENTRYPOINT ["lens"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
