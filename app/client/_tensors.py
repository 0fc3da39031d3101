"""Read result files into numpy arrays, and hand them out as numpy or torch.

A result is read into one writable buffer, and its tensors are numpy arrays over that
buffer, without a copy (torch tensors share the same memory): safetensors' loaders for
bytes copy every tensor out, which doubles the memory of a result of gigabytes. They
also reject BF16 (numpy has no such dtype), and trace results may be stored in BF16:
BF16 widens exactly to float32 for numpy (a copy), and goes back to ``torch.bfloat16``
exactly for torch users. torch is imported only when a torch tensor is asked for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
from typing import Any, Literal

import numpy as np

TensorBackend = Literal["auto", "numpy", "torch"]

_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def resolve_backend(backend: TensorBackend) -> Literal["numpy", "torch"]:
    """``auto`` means torch when it is installed, numpy otherwise."""
    if backend == "auto":
        return "torch" if importlib.util.find_spec("torch") is not None else "numpy"
    if backend not in ("numpy", "torch"):
        raise ValueError(f"tensors must be 'auto', 'numpy' or 'torch', got {backend!r}")
    return backend


def read_bytes(source: str | os.PathLike[str] | bytes | bytearray) -> bytearray:
    """A result file's bytes in a buffer of its own (a bytearray is taken as it is)."""
    if isinstance(source, bytearray):
        return source
    if isinstance(source, bytes | memoryview):
        return bytearray(source)
    with open(source, "rb") as f:
        buffer = bytearray(os.fstat(f.fileno()).st_size)
        if f.readinto(buffer) != len(buffer):
            raise ValueError(f"{source}: the file changed while it was read")
        return buffer


def read_metadata(data: bytes | bytearray) -> dict[str, str]:
    """The file's ``__metadata__`` (strings only), without touching the tensors."""
    return dict(_header(data)[0].get("__metadata__") or {})


def _header(data: bytes | bytearray) -> tuple[dict[str, Any], int]:
    """The JSON header and where the tensors' data starts."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("not a safetensors file: header length exceeds the file")
    try:
        header = json.loads(data[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: header is not a JSON object")
    return header, 8 + length


def read_arrays(data: bytes | bytearray) -> tuple[dict[str, np.ndarray], frozenset[str]]:
    """All tensors as numpy arrays over ``data`` (BF16 widened to float32, a copy), in
    file order, and the names that were BF16. The arrays are writable when ``data`` is a
    bytearray, and keep it alive."""
    header, start = _header(data)
    arrays: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype != "BF16" and dtype not in _NUMPY_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which this client cannot read")
        stored = np.dtype("<u2" if dtype == "BF16" else _NUMPY_DTYPES[dtype]).newbyteorder("<")
        count = math.prod(shape)
        if not 0 <= begin <= end <= len(data) - start or end - begin != count * stored.itemsize:
            raise ValueError(f"not a safetensors file: tensor {name!r} has bad data offsets")
        flat = np.frombuffer(data, dtype=stored, count=count, offset=start + begin)
        if dtype == "BF16":
            arrays[name] = (flat.astype(np.uint32) << 16).view(np.float32).reshape(shape)
            bf16.add(name)
        else:  # a view; a copy only on a big-endian machine
            arrays[name] = flat.astype(stored.newbyteorder("="), copy=False).reshape(shape)
    return arrays, frozenset(bf16)


def convert(array: np.ndarray, backend: Literal["numpy", "torch"], *, bf16: bool = False) -> Any:
    """``array`` as the caller's tensor type; a torch tensor shares its memory (copied
    only when the array is read-only, e.g. over a caller's ``bytes``)."""
    if backend == "numpy":
        return array
    import torch

    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    return tensor.to(torch.bfloat16) if bf16 else tensor


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax, computed in float64 and returned as float32."""
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(axis=axis, keepdims=True)
    out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return out.astype(np.float32)
