"""The real shapes' configurations and tokenizers, and the results file's sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import other_sections, write_section_into
from bench.shapes import SHAPES, sized_tokenizer

# Published sizes, written here from the models' cards, independently of bench/shapes.py.
PARAMETERS_M = {
    "smollm2-135m": 135,
    "pythia-160m": 162,
    "gpt2": 124,
    "qwen2.5-0.5b": 494,
    "llama-3.2-1b": 1236,
}


@pytest.mark.parametrize("name", PARAMETERS_M)
def test_each_shape_has_its_published_parameter_count(name: str) -> None:
    assert round(SHAPES[name].parameters() / 1e6) == PARAMETERS_M[name]


def test_gemma4_shape_has_wider_heads_in_its_full_attention_layers() -> None:
    config = SHAPES["gemma-4-e2b"].hf_config()
    widths = [layer.head_dim for layer in config.per_layer_config]
    full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    assert full == [4, 9, 14, 19, 24, 29, 34]
    assert {widths[i] for i in full} == {512}
    assert {w for i, w in enumerate(widths) if i not in full} == {256}


def test_the_tokenizer_has_the_models_vocabulary_size() -> None:
    tokenizer = sized_tokenizer(50304)
    assert len(tokenizer) == 50304
    ids = tokenizer("The capital of France is Paris")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and max(ids) < 200  # padding is never produced
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The capital of France is Paris"


def test_a_tier_replaces_its_own_section_and_keeps_the_others(tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    results.write_text("# Benchmark results\n\n## Results\n\n| a |\n\n## GPU check\n\nold\n")
    write_section_into(results, "## Real shapes", "## Real shapes\n\nfirst")
    write_section_into(results, "## GPU check", "## GPU check\n\nnew")
    write_section_into(results, "## Real shapes", "## Real shapes\n\nsecond")
    text = results.read_text()
    assert "old" not in text and "first" not in text
    assert text.index("## Results") < text.index("## GPU check") < text.index("## Real shapes")
    assert other_sections(text, ("## Results",)) == [
        "## GPU check", "", "new", "", "## Real shapes", "", "second",
    ]  # fmt: skip
