"""Models loaded with a ``device_map``: through accelerate's real dispatch, on the CPU.

No machine here has two GPUs, so the spread model is the tiny Llama with its last
block offloaded to disk: accelerate then hooks every block as it would across GPUs
(inputs moved to each block's device, outputs back to the input's), and the analyses
must give what they give on the same model loaded whole.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from app.core.config import ModelSpec
from workers.lens.gated_forward import gated_logits, shortcuts
from workers.lens.loading import LoadedModel, load_model
from workers.lens.scoring import score
from workers.lens.testing import build_tiny_model
from workers.lens.tracing import trace
from workers.registry import ModelRegistry, describe

TEXTS = ["the capital of france is", "one two three"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def whole(source: Path) -> LoadedModel:
    return load_model(str(source))


def _offload_last_block(lm: LoadedModel) -> dict[str, str]:
    last = lm.adapter.num_layers - 1
    names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    names += [f"model.layers.{i}" for i in range(lm.adapter.num_layers)]
    return {n: "disk" if n == f"model.layers.{last}" else "cpu" for n in names}


@pytest.fixture(scope="module")
def spread(
    source: Path, whole: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> LoadedModel:
    offload = tmp_path_factory.mktemp("offload")
    return load_model(str(source), device_map=_offload_last_block(whole), offload_dir=offload)


def test_spread_model_is_dispatched(spread: LoadedModel) -> None:
    assert spread.placement == ("cpu", "disk") and spread.spread
    assert spread.device == torch.device("cpu")
    assert hasattr(spread.model.model.layers[-1], "_hf_hook")  # accelerate's hook is on it


def test_auto_on_one_device_is_not_spread(source: Path, whole: LoadedModel) -> None:
    lm = load_model(str(source), device_map="auto")
    assert lm.placement == ("cpu",) and not lm.spread
    torch.testing.assert_close(
        score(lm, TEXTS).tensors["logits"], score(whole, TEXTS).tensors["logits"]
    )


def test_scores_and_traces_match_the_whole_model(whole: LoadedModel, spread: LoadedModel) -> None:
    for kwargs in ({}, {"top_k": 3}, {"final_token_only": True}):
        got, want = score(spread, TEXTS, **kwargs).tensors, score(whole, TEXTS, **kwargs).tensors
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=f"score {kwargs}: {name}")
    for positions in ("all", "last", [0, -1]):
        got, want = (trace(lm, TEXTS, positions=positions).tensors for lm in (spread, whole))
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=f"trace {positions}: {name}")


def test_gated_pass_and_gate_gradients_match(whole: LoadedModel, spread: LoadedModel) -> None:
    """CHG's gated pass: the written-out pass is refused for a spread model (its blocks
    would need their inputs moved), and the hooked pass gives the whole model's logits
    and gate gradients."""
    assert shortcuts(whole).written_out and not shortcuts(spread).written_out
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(whole.adapter.vocab_size, (3, 7), generator=gen)
    pick = torch.tensor([[0, 2], [1, 2], [2, 2]])
    gate_logits = torch.randn(2, whole.adapter.num_layers, whole.adapter.num_heads, generator=gen)
    results = []
    for lm in (whole, spread):
        g = gate_logits.clone().requires_grad_(True)
        logits = gated_logits(lm, ids, g.sigmoid(), 3, pick)
        (grad,) = torch.autograd.grad(logits.log_softmax(-1)[..., 5].sum(), g)
        results.append((logits.detach(), grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_registry_loads_with_the_spec_device_map(
    source: Path, whole: LoadedModel, tmp_path: Path
) -> None:
    spec = ModelSpec(source=str(source), device_map=_offload_last_block(whole))
    registry = ModelRegistry({"big": spec}, offload_dir=tmp_path / "offload")
    lm = registry.get("big")
    assert lm.spread and (tmp_path / "offload" / "big").is_dir()
    assert describe("big", lm)["device"] == "cpu, disk"


def test_spec_takes_one_placement() -> None:
    with pytest.raises(ValidationError, match="either device or device_map"):
        ModelSpec(source="m", device="cuda:0", device_map="auto")
    with pytest.raises(ValidationError, match="device_map must be"):
        ModelSpec(source="m", device_map="everywhere")
    assert ModelSpec(source="m", device_map={"model": 0, "lm_head": 1}).device_map == {
        "model": 0,
        "lm_head": 1,
    }
