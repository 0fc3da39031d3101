"""score() against plain transformers forward passes on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from workers.lens.errors import InvalidParameter
from workers.lens.loading import LoadedModel, load_model
from workers.lens.scoring import score
from workers.lens.testing import build_tiny_model

TEXTS = ["The capital of France is Paris", "a b a", "One two three four"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return load_model(str(path), device="cpu", dtype="float32")


def plain_logits(lm: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return lm.model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).logits, enc


def test_logits_match_a_plain_forward_pass(lm: LoadedModel) -> None:
    result = score(lm, TEXTS)
    expected, enc = plain_logits(lm, TEXTS)
    assert result.tensors["logits"].dtype == torch.float32
    torch.testing.assert_close(result.tensors["logits"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.tensors["input_ids"], enc["input_ids"])
    assert torch.equal(result.tensors["attention_mask"], enc["attention_mask"])
    assert result.tensors["attention_mask"].sum(1).tolist() != [enc["input_ids"].shape[1]] * 3


def test_final_token_logits_are_each_texts_last_real_token(lm: LoadedModel) -> None:
    result = score(lm, TEXTS)
    final = result.tensors["final_token_logits"]
    assert final.shape == (len(TEXTS), lm.adapter.vocab_size)
    for i, text in enumerate(TEXTS):
        alone, _ = plain_logits(lm, [text])
        torch.testing.assert_close(final[i], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_temperature_divides_every_logit(lm: LoadedModel) -> None:
    base = score(lm, TEXTS).tensors
    hot = score(lm, TEXTS, temperature=2.5).tensors
    torch.testing.assert_close(hot["logits"], base["logits"] / 2.5)
    torch.testing.assert_close(hot["final_token_logits"], base["final_token_logits"] / 2.5)


def test_final_token_only_leaves_out_the_per_position_logits(lm: LoadedModel) -> None:
    full = score(lm, TEXTS).tensors
    only = score(lm, TEXTS, final_token_only=True, temperature=0.5).tensors
    assert set(only) == {"final_token_logits", "input_ids", "attention_mask"}
    torch.testing.assert_close(only["final_token_logits"], full["final_token_logits"] / 0.5)
    assert set(score(lm, TEXTS, final_token_only=True, top_k=3).tensors) == set(only)


def test_top_k_is_a_slice_of_the_full_logits(lm: LoadedModel) -> None:
    full = score(lm, TEXTS, temperature=0.7).tensors
    top = score(lm, TEXTS, temperature=0.7, top_k=5).tensors
    assert "logits" not in top
    values, ids = top["top_k_logits"], top["top_k_ids"]
    assert values.shape == ids.shape == (*full["logits"].shape[:2], 5)
    assert ids.dtype == torch.int64
    torch.testing.assert_close(values, full["logits"].gather(-1, ids))
    torch.testing.assert_close(values, full["logits"].sort(-1, descending=True).values[..., :5])
    torch.testing.assert_close(top["final_token_logits"], full["final_token_logits"])


def test_summary_names_the_most_likely_next_token(lm: LoadedModel) -> None:
    result = score(lm, TEXTS, temperature=2.0)
    final = result.tensors["final_token_logits"]
    lengths = result.tensors["attention_mask"].sum(1).tolist()
    for row, entry in enumerate(result.summary["texts"]):
        best = int(final[row].argmax())
        assert entry["num_tokens"] == lengths[row]
        assert entry["next_token_id"] == best
        assert entry["next_token"] == lm.tokenizer.decode([best])
        assert math.isclose(
            entry["next_token_prob"], float(final[row].softmax(-1)[best]), rel_tol=1e-5
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 10_000}, "top_k"),
    ],
)
def test_invalid_parameters_name_their_field(lm: LoadedModel, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        score(lm, TEXTS, **kwargs)
    assert info.value.field == field


def test_no_texts_is_an_invalid_parameter(lm: LoadedModel) -> None:
    with pytest.raises(InvalidParameter) as info:
        score(lm, [])
    assert info.value.field == "texts"
