"""ModelRegistry: resident models within a budget, least recently used evicted first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.core.config import ModelSpec
from workers.lens.testing import build_tiny_model
from workers.registry import ModelRegistry, model_bytes


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "a": build_tiny_model("llama", root / "a"),
        "b": build_tiny_model("gpt2", root / "b"),
        "c": build_tiny_model("llama", root / "c", seed=1),
    }


def registry(sources: dict[str, Path], **budget: int) -> ModelRegistry:
    specs = {n: ModelSpec(source=str(p), device="cpu", dtype="float32") for n, p in sources.items()}
    return ModelRegistry(specs, **budget)


def test_models_stay_resident_and_hits_are_counted(sources: dict[str, Path]) -> None:
    reg = registry(sources)
    first = reg.get("a")
    assert reg.get("a") is first
    reg.get("b")
    stats = reg.stats()
    assert stats["resident"] == ["a", "b"]
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (1, 2, pytest.approx(1 / 3))
    assert stats["loads"] == {"a": 1, "b": 1} and stats["evictions"] == {}
    assert set(stats["load_seconds"]) == {"a", "b"} and all(
        s > 0 for s in stats["load_seconds"].values()
    )


def test_count_budget_evicts_the_least_recently_used(sources: dict[str, Path]) -> None:
    reg = registry(sources, max_models=2)
    reg.get("a")
    reg.get("b")
    reg.get("a")  # b is now the least recently used
    reg.get("c")
    assert list(reg.loaded) == ["a", "c"]
    reg.get("b")
    assert list(reg.loaded) == ["c", "b"]
    stats = reg.stats()
    assert stats["evictions"] == {"b": 1, "a": 1}
    assert stats["loads"] == {"a": 1, "b": 2, "c": 1}
    assert stats["misses"] == 4 and stats["hits"] == 1


def test_byte_budget_counts_parameters_and_buffers(sources: dict[str, Path]) -> None:
    probe = registry(sources)
    sizes = {name: model_bytes(probe.get(name)) for name in sources}
    lm = probe.get("a")
    expected = sum(p.numel() * 4 for p in lm.model.parameters()) + sum(
        b.numel() * b.element_size() for b in lm.model.buffers()
    )
    assert sizes["a"] == expected and all(p.dtype == torch.float32 for p in lm.model.parameters())
    reg = registry(sources, max_bytes=sizes["a"] + sizes["c"])
    reg.get("a")
    reg.get("c")
    assert list(reg.loaded) == ["a", "c"] and reg.resident_bytes() == sizes["a"] + sizes["c"]
    reg.get("b")
    assert reg.resident_bytes() <= sizes["a"] + sizes["c"]
    assert "a" not in reg.loaded and list(reg.loaded)[-1] == "b"


def test_a_model_larger_than_the_budget_still_loads_alone(sources: dict[str, Path]) -> None:
    reg = registry(sources, max_bytes=1)
    reg.get("a")
    reg.get("b")
    assert list(reg.loaded) == ["b"]


def test_budget_must_be_positive(sources: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="max_models"):
        registry(sources, max_models=0)


def test_a_source_written_as_a_path_must_be_a_directory(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").symlink_to(sources["a"].parent)
    home = ModelSpec(source=f"~/models/{sources['a'].name}")
    assert home.source == str(tmp_path / "models" / sources["a"].name)
    assert ModelRegistry({"a": home}).get("a").source == home.source
    monkeypatch.chdir(tmp_path)
    for missing in (str(tmp_path / "nowhere"), "./nowhere", "../nowhere", "~/nowhere"):
        reg = ModelRegistry({"m": ModelSpec(source=missing)})
        with pytest.raises(FileNotFoundError, match="no such directory"):
            reg.get("m")
