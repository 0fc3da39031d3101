"""The analysis core: plain PyTorch and transformers, no web or queue imports.

Submodules are imported explicitly; this package imports nothing so that the
torch-free vocabulary in :mod:`workers.lens.sites` can be shared with the API.
"""
