"""lens-server's web side: API, job store, blob store, client and CLI. Never imports torch."""

__version__ = "0.1.0"
