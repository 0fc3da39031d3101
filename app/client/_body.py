"""Where a result's body goes as it arrives: one buffer, or a file.

httpx's ``response.content`` keeps the chunks it receives and joins them at the end, a
second copy of a body that may be gigabytes; a download to a file went through that
copy in memory too. Here the chunks are copied once, into a buffer of the length the
server declares or straight into the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO

import httpx


class BodySink:
    """Takes the chunks of one response body; ``into`` names a file to write it to
    (atomically: a temporary file beside it, renamed when the body is whole)."""

    def __init__(self, response: httpx.Response, into: Path | None = None) -> None:
        declared = response.headers.get("content-length", "")
        encoded = response.headers.get("content-encoding", "identity") != "identity"
        # the declared length is that of the encoded body; httpx hands on the decoded one
        self.expected = int(declared) if declared.isdigit() and not encoded else None
        self.size = 0
        self.into = into
        self._file: IO[bytes] | None = None
        self._buffer = bytearray()
        if into is not None:
            fd, temp = tempfile.mkstemp(dir=into.parent, prefix=f".{into.name}.")
            self._temp = Path(temp)
            self._file = os.fdopen(fd, "wb")
        elif self.expected is not None:
            self._buffer = bytearray(self.expected)

    def add(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if self._file is not None:
            self._file.write(chunk)
        elif self.expected is None:
            self._buffer += chunk
        else:  # h11 never passes on more than the declared length
            self._buffer[self.size : end] = chunk
        self.size = end

    def finish(self) -> bytearray | Path:
        """The whole body: the buffer, or the file's path once it is in place."""
        if self.expected is not None and self.size != self.expected:
            self.abort()
            raise httpx.RemoteProtocolError(
                f"the body ended at {self.size} of the {self.expected} bytes declared"
            )
        if self._file is None or self.into is None:
            return self._buffer
        self._file.close()
        os.replace(self._temp, self.into)
        return self.into

    def abort(self) -> None:
        """Drop what arrived (a retry starts over; a failure leaves no partial file)."""
        if self._file is not None:
            self._file.close()
            self._temp.unlink(missing_ok=True)
        self._buffer = bytearray()
