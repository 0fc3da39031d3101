"""How the client takes a result's body: into one buffer of the declared length, or
streamed into a file, and what it does when the body breaks off."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.numpy

from app.client import AsyncLensClient, LensClient, RetryPolicy, ScoreResult
from app.client._body import BodySink
from app.client._tensors import read_arrays

JOB = "a" * 32
FAST = RetryPolicy(attempts=3, backoff_s=0.0)


def score_file() -> bytes:
    tensors = {
        "logits": np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5),
        "final_token_logits": np.ones((2, 5), np.float32),
        "input_ids": np.array([[1, 2, 3], [4, 5, 0]]),
        "attention_mask": np.array([[1, 1, 1], [1, 1, 0]]),
    }
    meta = {"kind": "score", "job_id": JOB, "model": "demo", "params": "{}", "summary": "{}"}
    return safetensors.numpy.save(tensors, metadata=meta)


def document() -> dict[str, object]:
    return {"id": JOB, "kind": "score", "model": "demo", "status": "succeeded", "error": None}


class _Broken(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that breaks off after its first ``keep`` bytes."""

    def __init__(self, data: bytes, keep: int) -> None:
        self.data, self.keep = data, keep

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.keep]
        raise httpx.ReadError("connection reset mid-body")

    async def __aiter__(self):  # type: ignore[override]
        yield self.data[: self.keep]
        raise httpx.ReadError("connection reset mid-body")


def _routes(bodies: list[httpx.Response]):
    """The job's record, then the result answers in turn."""
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.path.endswith("/result"):
            return bodies.pop(0)
        return httpx.Response(200, json=document())

    return handle, requests


def _broken_then_whole(data: bytes) -> list[httpx.Response]:
    length = {"content-length": str(len(data))}
    return [
        httpx.Response(200, headers=length, stream=_Broken(data, 100)),
        httpx.Response(200, headers=length, stream=httpx.ByteStream(data)),
    ]


def test_a_body_lands_in_one_buffer_of_its_declared_length() -> None:
    data = score_file()
    response = httpx.Response(200, headers={"content-length": str(len(data))})
    sink = BodySink(response)
    for start in range(0, len(data), 1000):
        sink.add(data[start : start + 1000])
    out = sink.finish()
    assert isinstance(out, bytearray) and out == data


def test_a_short_body_is_an_error_and_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "result.safetensors"
    sink = BodySink(httpx.Response(200, headers={"content-length": "10"}), into=target)
    sink.add(b"12345")
    with pytest.raises(httpx.RemoteProtocolError, match="5 of the 10 bytes"):
        sink.finish()
    assert list(tmp_path.iterdir()) == []


def test_tensors_are_writable_views_of_the_downloaded_buffer() -> None:
    buffer = bytearray(score_file())
    arrays, _ = read_arrays(buffer)
    logits = arrays["logits"]
    assert np.shares_memory(logits, np.frombuffer(buffer, np.uint8))
    assert logits.flags.writeable and logits[1, 2, 4] == 29.0


def test_bad_data_offsets_are_refused() -> None:
    data = bytearray(score_file())
    (length,) = np.frombuffer(data[:8], "<u8")
    header = json.loads(data[8 : 8 + length])
    begin, end = header["logits"]["data_offsets"]
    header["logits"]["data_offsets"] = [begin, end + 4]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(int(length))
    assert len(text) == length
    with pytest.raises(ValueError, match="bad data offsets"):
        read_arrays(data[:8] + text + data[8 + length :])


def test_a_broken_download_is_retried_whole_and_leaves_no_partial_file(
    tmp_path: Path,
) -> None:
    data = score_file()
    handle, requests = _routes(_broken_then_whole(data))
    with LensClient(
        "http://lens.test", retry=FAST, progress=False, transport=httpx.MockTransport(handle)
    ) as lens:
        saved = lens.job(JOB).download(tmp_path / "r.safetensors")
    assert saved.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]
    assert sum(r.url.path.endswith("/result") for r in requests) == 2


def test_the_async_client_retries_a_broken_result_too() -> None:
    data = score_file()
    handle, _ = _routes(_broken_then_whole(data))

    async def main() -> ScoreResult:
        async with AsyncLensClient(
            "http://lens.test",
            retry=FAST,
            progress=False,
            tensors="numpy",
            transport=httpx.MockTransport(handle),
        ) as lens:
            result = await (await lens.job(JOB)).result()
            assert isinstance(result, ScoreResult)
            return result

    result = asyncio.run(main())
    assert result.logits.shape == (2, 3, 5) and result.logits[1, 2, 4] == 29.0
