"""chg and cchg take ``checkpoint_above`` (attribute's name and meaning: gradient
checkpointing for inputs of that many tokens or more), and the peak memory estimated at
submission follows it."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from app.core.jobsize import ModelShape, peak_bytes
from app.schemas import CchgJob, ChgJob, JobRequest

requests: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)
LLAMA_1B = ModelShape(
    layers=16, heads=32, head_dim=64, hidden_size=2048, vocab_size=128256, intermediate_size=8192
)
CHG = {"kind": "chg", "model": "m", "texts": ["a"], "targets": ["b"], "num_masks": 1}
CCHG = {
    "kind": "cchg",
    "model": "m",
    **{f"{side}_{part}": ["a"] for side in ("retain", "forget") for part in ("texts", "targets")},
}


@pytest.mark.parametrize("body", [CHG, CCHG], ids=["chg", "cchg"])
def test_checkpoint_above_is_accepted_and_checked(body: dict) -> None:
    job = requests.validate_python(body)
    assert isinstance(job, ChgJob | CchgJob) and job.checkpoint_above == 512
    assert requests.validate_python(body | {"checkpoint_above": 64}).checkpoint_above == 64
    with pytest.raises(ValidationError, match="checkpoint_above"):
        requests.validate_python(body | {"checkpoint_above": 0})


def peak(body: dict, prompt_tokens: int, checkpoint_above: int) -> int:
    job = requests.validate_python(body | {"checkpoint_above": checkpoint_above})
    if job.kind == "chg":
        tokens = {"texts": [prompt_tokens] * 2, "targets": [2, 2]}
    else:
        sides = ("retain", "forget")
        tokens = {
            f"{s}_{p}": [prompt_tokens if p == "texts" else 2]
            for s in sides
            for p in ("texts", "targets")
        }
    return peak_bytes(job, LLAMA_1B, tokens)


@pytest.mark.parametrize("body", [CHG | {"batch_size": 2}, CCHG], ids=["chg", "cchg"])
def test_the_peak_estimate_follows_checkpointing(body: dict) -> None:
    plain, ckpt = peak(body, 1022, 4096), peak(body, 1022, 512)
    # Checkpointed, each of the 16 blocks keeps one hidden width per token instead of its
    # whole graph (7 hidden and 3 MLP widths), and the backward pass rebuilds one block's
    # graph at a time (counted 3 times over: its gradients, the passes' transients).
    assert ckpt < plain / 3
    # Examples of 1024 tokens: checkpointed under checkpoint_above=1023; counted as not
    # at 1024 (a text joined to its target may be a token shorter than its two counts).
    assert peak(body, 1022, 1023) == ckpt
    assert peak(body, 1022, 1024) == peak(body, 1022, 1025) == plain
