"""Read result files into numpy arrays, and hand them out as numpy or torch.

safetensors' own numpy loader rejects BF16 (numpy has no such dtype), and trace
results may be stored in BF16; so the raw buffers from ``safetensors.deserialize``
are mapped here: BF16 widens exactly to float32 for numpy, and goes back to
``torch.bfloat16`` exactly for torch users. torch is imported only when a torch
tensor is asked for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors

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


def read_bytes(source: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    with open(source, "rb") as f:
        return f.read()


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write a file whole or not at all (temp file beside it, then rename)."""
    target = Path(path)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temp, target)
    return target


def read_metadata(data: bytes) -> dict[str, str]:
    """The file's ``__metadata__`` (strings only), without touching the tensors."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("not a safetensors file: header length exceeds the file")
    try:
        header = json.loads(data[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a safetensors file: header is not JSON ({exc})") from None
    return dict(header.get("__metadata__") or {})


def read_arrays(data: bytes) -> tuple[dict[str, np.ndarray], frozenset[str]]:
    """All tensors as numpy arrays (BF16 widened to float32), and the names that were BF16."""
    arrays: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for name, info in safetensors.deserialize(data):
        dtype, shape, raw = info["dtype"], info["shape"], info["data"]
        if dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arrays[name] = bits.view(np.float32).reshape(shape)
            bf16.add(name)
        elif dtype in _NUMPY_DTYPES:
            native = np.dtype(_NUMPY_DTYPES[dtype])
            little = np.frombuffer(raw, dtype=native.newbyteorder("<"))
            arrays[name] = little.astype(native).reshape(shape)
        else:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which this client cannot read")
    return arrays, frozenset(bf16)


def convert(array: np.ndarray, backend: Literal["numpy", "torch"], *, bf16: bool = False) -> Any:
    """``array`` as the caller's tensor type (a torch tensor shares no memory with the file)."""
    if backend == "numpy":
        return array
    import torch

    tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor.to(torch.bfloat16) if bf16 else tensor


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax, computed in float64 and returned as float32."""
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(axis=axis, keepdims=True)
    out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return out.astype(np.float32)
