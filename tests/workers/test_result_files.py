"""Result files as the worker writes them: safetensors that the library reads back
exactly, written atomically."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from app.blobstore import WRITE_CHUNK_BYTES, BlobStore, BlobTensor
from workers.outcomes import blob_tensor

JOB = "0123456789abcdef0123456789abcdef"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f64": torch.tensor(2.5, dtype=torch.float64),  # 0-d
        "i64": torch.arange(5),
        "i32": torch.arange(-3, 4, dtype=torch.int32),
        "i16": torch.tensor([1, -2], dtype=torch.int16),
        "i8": torch.tensor([-7], dtype=torch.int8),
        "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        # over several write chunks, and not a whole number of them
        "large": torch.randn(WRITE_CHUNK_BYTES // 2 + 3, generator=g),
    }


def _write(root: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    return BlobStore(root).write(JOB, {k: blob_tensor(v) for k, v in tensors.items()}, meta)


def test_the_safetensors_library_reads_back_every_dtype_exactly(tmp_path: Path) -> None:
    tensors = _tensors()
    meta = {"job_id": JOB, "params": '{"texts": ["Grüße 😀 日本"]}'}
    path = _write(tmp_path, tensors, meta)
    assert path == BlobStore(tmp_path).path(JOB)
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype, name
        assert back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == meta


def test_every_tensor_starts_at_a_multiple_of_its_item_size(tmp_path: Path) -> None:
    """So a reader can map each tensor in place (numpy and torch views need alignment)."""
    tensors = _tensors()
    raw = _write(tmp_path, tensors, {}).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert "__metadata__" not in header
    ends = []
    for name, tensor in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert begin % tensor.element_size() == 0, name
        assert raw[8 + length + begin : 8 + length + end] == _bytes_of(tensor), name
        ends.append((begin, end))
    ends.sort()
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ends))  # no gaps
    assert len(raw) == 8 + length + ends[-1][1]


def test_a_view_into_a_larger_tensor_stores_only_its_own_elements(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    part = base[8:14].view(2, 3)  # contiguous, at an offset in its storage
    alias = base[8:14]  # the same memory again, under another name
    back = load_file(_write(tmp_path, {"part": part, "alias": alias}, {}))
    assert torch.equal(back["part"], part)
    assert torch.equal(back["alias"], alias)


def test_a_failed_write_leaves_neither_the_result_nor_a_temporary_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.path(JOB).mkdir(parents=True)  # the rename onto it fails
    with pytest.raises(OSError):
        store.write(JOB, {"x": blob_tensor(torch.ones(3))}, {})
    assert [p.name for p in store.path(JOB).parent.iterdir()] == [store.path(JOB).name]


@pytest.mark.parametrize(
    ("dtype", "shape", "size", "message"),
    [
        ("complex64", (2,), 16, "cannot hold complex64"),
        ("float32", (2, 3), 20, "20 bytes for a float32 (2, 3) tensor"),
    ],
)
def test_a_tensor_whose_bytes_do_not_match_its_description_is_refused(
    dtype: str, shape: tuple[int, ...], size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BlobTensor(dtype=dtype, shape=shape, data=memoryview(bytes(size)))


def _bytes_of(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
