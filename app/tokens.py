"""Exact token counts at submission, with the fast tokenizer a worker published.

A worker that loads a model with a fast tokenizer publishes the tokenizer as
``tokenizers`` serialises it (JSON, compressed: a 150k vocabulary is ~10 MB of it)
under a key named by its content's hash, and names the hash in the model's info. The
API loads it once per hash with ``tokenizers`` (Rust, no torch), keeps a few, and counts
tokens as the worker does (``app.core.jobsize.count_tokens``) in the thread pool:
``encode_batch_fast`` releases the GIL, so the event loop runs on meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import zlib
from collections import OrderedDict

import redis
from tokenizers import Tokenizer

from app import presence
from app.core.jobsize import Encode

log = logging.getLogger(__name__)

CACHED_TOKENIZERS = 8
"""Tokenizers an API process keeps loaded (tens of MB each for a large vocabulary)."""


def pack(tokenizer_json: str) -> tuple[str, bytes]:
    """A tokenizer's JSON as it is published: its hash (SHA-256, hex) and compressed bytes."""
    data = tokenizer_json.encode()
    return hashlib.sha256(data).hexdigest(), zlib.compress(data)


def unpack(blob: bytes) -> Tokenizer:
    """A published tokenizer, ready to count: without truncation or padding, as the
    worker tokenises when it counts."""
    tokenizer = Tokenizer.from_str(zlib.decompress(blob).decode())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def encoder(tokenizer: Tokenizer) -> Encode:
    """Each text's token count, special tokens included."""

    def encode(texts: list[str]) -> list[int]:
        return [len(e) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=True)]

    return encode


class TokenizerCache:
    """The published tokenizers this process has loaded, by hash; the least recently used
    goes beyond ``size``. One that cannot be read (a newer ``tokenizers`` wrote it, say)
    is remembered as such, so that it is not fetched again at every submission."""

    def __init__(self, size: int = CACHED_TOKENIZERS) -> None:
        self._size = size
        self._loaded: OrderedDict[str, Tokenizer | None] = OrderedDict()
        self._lock = threading.Lock()
        self._loading = threading.Lock()
        """Held while one is fetched and parsed: a burst of submissions loads it once."""

    def get(self, connection: redis.Redis, sha256: str) -> Tokenizer | None:
        """The tokenizer published as ``sha256``; None if it is not (or cannot be read)."""
        found, tokenizer = self._lookup(sha256)
        if found:
            return tokenizer
        with self._loading:
            found, tokenizer = self._lookup(sha256)
            if found:
                return tokenizer
            blob = presence.published_tokenizer(connection, sha256)
            if blob is None:
                return None
            try:
                tokenizer = unpack(blob)
            except Exception as exc:  # tokenizers raises a plain Exception for bad JSON
                log.warning("cannot read the published tokenizer %s: %s", sha256[:12], exc)
            with self._lock:
                self._loaded[sha256] = tokenizer
                while len(self._loaded) > self._size:
                    self._loaded.popitem(last=False)
            return tokenizer

    def _lookup(self, sha256: str) -> tuple[bool, Tokenizer | None]:
        with self._lock:
            if sha256 not in self._loaded:
                return False, None
            self._loaded.move_to_end(sha256)
            return True, self._loaded[sha256]


TOKENIZERS = TokenizerCache()
"""This process's tokenizers: content-addressed, so one cache serves every app in it."""


def published_encoder(connection: redis.Redis, sha256: str | None) -> Encode | None:
    """How the API counts a model's tokens: with its published tokenizer (``sha256``,
    from its info), or None where there is none (the API then guesses)."""
    if sha256 is None:
        return None
    tokenizer = TOKENIZERS.get(connection, sha256)
    return encoder(tokenizer) if tokenizer is not None else None
