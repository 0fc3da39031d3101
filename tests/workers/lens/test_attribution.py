"""Sentence attribution through a head mask, checked against a hand-written computation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from workers.lens.attribution import attribute, map_tokens, sentence_spans
from workers.lens.demo import MAX_COPY_LENGTH, WORDS, ensure_demo_model
from workers.lens.errors import ContextTooLong, InvalidParameter
from workers.lens.loading import LoadedModel, load_model
from workers.lens.testing import build_tiny_model

DOCUMENT = (
    "The capital of France is Paris. The capital of Italy is Rome. The capital of France is Paris."
)
SENTENCES = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome.",
    "The capital of France is Paris.",
]
SUMMARY = "Rome is the capital"

DEMO_DOCUMENT = "red cat blue dog .\nsun tree cup hat .\nred cat blue dog ."
DEMO_SENTENCES = ["red cat blue dog .", "sun tree cup hat .", "red cat blue dog ."]
DEMO_SUMMARY = "| red cat blue dog"


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return load_model(str(path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(str(ensure_demo_model()), device="cpu", dtype="float32")


def _random_gates(lm: LoadedModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    gates = torch.rand(lm.adapter.num_layers, lm.adapter.num_heads, generator=gen)
    gates[0, 1] = 0.0
    gates[1, 2] = 1.0
    return gates


@pytest.fixture(scope="module")
def mask(lm: LoadedModel) -> torch.Tensor:
    return _random_gates(lm)


def _walked_offsets(lm: LoadedModel, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character spans from walking the token strings along the text (not the tokenizer's offsets).

    Works for the two test tokenizers on ASCII text: byte-level BPE ("Ġ" is a
    space, kept in the token) and the demo's word level (spaces dropped between
    tokens). A token's leading spaces are not part of its span; BOS covers none.
    """
    spans, cursor = [], 0
    for token in lm.tokenizer.convert_ids_to_tokens(ids):
        if token == lm.tokenizer.bos_token:
            spans.append((0, 0))
            continue
        piece = token.replace("Ġ", " ")
        while not text.startswith(piece, cursor):
            assert text[cursor] == " ", (text, cursor, piece)
            cursor += 1
        end = cursor + len(piece)
        spans.append((end - len(piece.lstrip(" ")), end))
        cursor = end
    assert cursor == len(text)
    return spans


def _reference(
    lm: LoadedModel, document: str, sentences: list[str], summary: str, mask: torch.Tensor, how: str
) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Scores, token norms and token→sentence map by plain autograd and a hand-written head mask."""
    text = document + " " + summary
    ids = lm.tokenizer(text)["input_ids"]
    spans = _walked_offsets(lm, text, ids)
    summary_start = next(i for i, (_, end) in enumerate(spans) if end > len(document) + 1)

    starts, cursor = [], 0
    for sentence in sentences:
        cursor = document.index(sentence, cursor)
        starts.append((cursor, cursor + len(sentence)))
        cursor += len(sentence)
    owner = []
    for start, end in spans[:summary_start]:
        middle = (start + end) / 2
        inside = [j for j, (a, b) in enumerate(starts) if end > start and a <= middle < b]
        owner.append(inside[0] if inside else -1)

    def gate(layer: int):
        def hook(_m, args):
            x = args[0]
            heads = x.unflatten(-1, (lm.adapter.num_heads, lm.adapter.head_dim))
            return ((heads * mask[layer][:, None]).flatten(-2),)

        return hook

    handles = [p.o_proj.register_forward_pre_hook(gate(i)) for i, p in enumerate(lm.adapter.blocks)]
    try:
        input_ids = torch.tensor([ids])
        embeds = lm.model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        logits = lm.model(inputs_embeds=embeds).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        ll = sum(log_probs[t - 1, ids[t]] for t in range(summary_start, len(ids)))
        (grad,) = torch.autograd.grad(ll, embeds)
    finally:
        for handle in handles:
            handle.remove()
    norms = grad[0, :summary_start].norm(dim=-1)
    owners = torch.tensor(owner)
    reduce = {"mean": torch.mean, "sum": torch.sum, "max": torch.max}[how]
    scores = [float(reduce(norms[owners == j])) for j in range(len(sentences))]
    return scores, norms, owners


CASES = {
    "tiny": (DOCUMENT, SENTENCES, SUMMARY),
    "demo": (DEMO_DOCUMENT, DEMO_SENTENCES, DEMO_SUMMARY),
}


@pytest.mark.parametrize("how", ["mean", "sum", "max"])
@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_matches_hand_written_reference(
    request: pytest.FixtureRequest, model: str, how: str
) -> None:
    lm = request.getfixturevalue("lm" if model == "tiny" else "demo")
    document, sentences, summary = CASES[model]
    mask = _random_gates(lm)
    result = attribute(
        lm, document, sentences, summary, mask,
        aggregate=how, target_join="raw", normalize="none", loss="sum",
    )  # fmt: skip
    scores, norms, owners = _reference(lm, document, sentences, summary, mask, how)
    got = result.summary["scores"]
    assert len(got) == len(sentences) and all(math.isfinite(s) for s in got)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(scores), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.tensors["token_grad_norms"], norms, rtol=1e-5, atol=1e-5)
    assert torch.equal(result.tensors["token_sentence"], owners)
    torch.testing.assert_close(result.tensors["sentence_scores"], torch.tensor(scores))
    assert result.summary["sentence_tokens"] == [int((owners == j).sum()) for j in range(3)]
    assert result.tensors["token_sentence"].dtype == torch.int64
    joined = lm.tokenizer(document + " " + summary)["input_ids"]
    assert result.tensors["input_ids"].tolist() == joined


def _copy_cases(n: int) -> list[tuple[str, str]]:
    """(copied, other) word runs: distinct demo words, as many as the demo model copied in
    training."""
    rng = random.Random(0)
    cases = []
    for _ in range(n):
        words = rng.sample(WORDS, MAX_COPY_LENGTH)
        cut = rng.randint(3, 4)
        cases.append((" ".join(words[:cut]), " ".join(words[cut:])))
    return cases


def test_the_copied_sentence_scores_higher_and_a_broken_circuit_shows(
    demo: LoadedModel,
) -> None:
    """The summary copies the first sentence after "|"; the other sentence is never copied.

    Through all heads the copied sentence scores higher on average, and the summary's NLL
    through the circuit is the model's. Gating off the last layer (where the demo's
    induction heads live) breaks the copy: the summary NLL through that circuit says so.
    """
    full = torch.ones(demo.adapter.num_layers, demo.adapter.num_heads)
    no_copy = full.clone()
    no_copy[-1] = 0.0
    ratios = []
    for copied, other in _copy_cases(4):
        args = (demo, f"{copied} {other}", [copied, other], f"| {copied}")
        with_circuit = attribute(*args, full).summary
        without = attribute(*args, no_copy).summary
        ratios.append(with_circuit["scores"][0] / with_circuit["scores"][1])
        nll, broken = with_circuit["summary_nll"], without["summary_nll"]
        assert nll["circuit"] == pytest.approx(nll["all_heads"], rel=1e-4)
        assert broken["all_heads"] == pytest.approx(nll["all_heads"], rel=1e-4)
        assert broken["circuit"] > broken["all_heads"] + 1.0
    assert sum(ratios) / len(ratios) > 1.0, ratios


def test_defaults_are_the_seeds(lm: LoadedModel, mask: torch.Tensor) -> None:
    """Mean loss, scores over their maximum, and the summary tokenised apart with a space."""
    raw = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask, normalize="none", loss="sum")
    default = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask)
    n = default.summary["summary_tokens"]
    torch.testing.assert_close(
        default.tensors["token_grad_norms"], raw.tensors["token_grad_norms"] / n
    )
    scores = torch.tensor(raw.summary["scores"])
    assert default.summary["scores"] == pytest.approx((scores / scores.max()).tolist(), rel=1e-5)
    assert max(default.summary["scores"]) == pytest.approx(1.0)
    document = lm.tokenizer(DOCUMENT)["input_ids"]
    summary = lm.tokenizer(" " + SUMMARY, add_special_tokens=False)["input_ids"]
    assert default.tensors["input_ids"].tolist() == document + summary
    assert default.summary["document_tokens"] == len(document) and n == len(summary)
    assert (default.summary["target_join"], default.summary["normalize"]) == ("space", "max")
    assert default.summary["loss"] == "mean"


def test_summary_nll_with_all_heads_and_through_the_circuit(
    lm: LoadedModel, mask: torch.Tensor
) -> None:
    gated = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask).summary
    full = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, torch.ones_like(mask)).summary
    n = gated["summary_tokens"]
    assert gated["summary_nll"]["circuit"] == pytest.approx(-gated["summary_log_likelihood"] / n)
    assert gated["summary_nll"]["all_heads"] == pytest.approx(full["summary_nll"]["circuit"])
    assert full["summary_nll"]["all_heads"] == pytest.approx(full["summary_nll"]["circuit"])
    assert gated["summary_nll"]["circuit"] != pytest.approx(gated["summary_nll"]["all_heads"])


def test_repeated_sentences_map_to_successive_occurrences(
    lm: LoadedModel, mask: torch.Tensor
) -> None:
    owners = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask).tensors["token_sentence"]
    first = (owners == 0).nonzero().flatten()
    third = (owners == 2).nonzero().flatten()
    assert len(first) == len(third) > 0 and bool((third > first.max()).all())
    # The same text listed once maps to its first occurrence; the rest of the document to none.
    once = attribute(lm, DOCUMENT, SENTENCES[:1], SUMMARY, mask).tensors["token_sentence"]
    assert torch.equal(once == 0, owners == 0)


def test_mask_changes_the_scores(lm: LoadedModel, mask: torch.Tensor) -> None:
    gated = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask).summary["scores"]
    full = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, torch.ones_like(mask)).summary["scores"]
    assert gated != pytest.approx(full)


def test_sentence_next_to_punctuation() -> None:
    document = "Paris, France. Rome!"
    spans = sentence_spans(document, ["Paris", "France", "Rome"])
    assert spans == [(0, 5), (7, 13), (15, 19)]
    # Offsets as a word-level tokenizer with punctuation split off would give them.
    offsets = [(0, 0), (0, 5), (5, 6), (7, 13), (13, 14), (15, 19), (19, 20)]
    assert map_tokens(offsets, spans).tolist() == [-1, 0, -1, 1, -1, 2, -1]
    # A token straddling two sentences goes to the one it shares most characters with (ties: the
    # earlier one).
    assert map_tokens([(3, 9), (3, 7)], [(0, 5), (5, 10)]).tolist() == [1, 0]


def test_checkpointing_recomputes_and_gives_the_same_scores(
    lm: LoadedModel, mask: torch.Tensor
) -> None:
    calls = []
    mlp = lm.adapter.blocks[0].mlp
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        plain = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask, checkpoint_above=10_000)
        n_plain = len(calls)
        ckpt = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask, checkpoint_above=1)
    finally:
        handle.remove()
    # The gradient pass and the all-heads pass; then the first is recomputed in the backward.
    assert n_plain == 2 and len(calls) - n_plain == 3
    assert not plain.summary["checkpointed"] and ckpt.summary["checkpointed"]
    torch.testing.assert_close(
        ckpt.tensors["token_grad_norms"], plain.tensors["token_grad_norms"], rtol=1e-5, atol=1e-6
    )


def test_shared_model_is_left_unchanged(lm: LoadedModel, mask: torch.Tensor) -> None:
    attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask, checkpoint_above=1)
    with pytest.raises(InvalidParameter):
        attribute(lm, DOCUMENT, ["absent"], SUMMARY, mask, checkpoint_above=1)
    model = lm.model
    assert not model.training
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not module._backward_pre_hooks


def test_too_long_document_is_a_clear_error(lm: LoadedModel, mask: torch.Tensor) -> None:
    document = " ".join(["The capital of France is Paris."] * 12)
    with pytest.raises(ContextTooLong) as err:
        attribute(lm, document, ["The capital"], SUMMARY, mask)
    assert err.value.field == "document" and "64" in err.value.message


@pytest.mark.parametrize(
    ("sentences", "needle"),
    [
        ([], "at least one"),
        (["The capital of France is Paris.", "  "], "[1]"),
        (["The capital of Spain is Madrid."], "sentence 0"),
        (SENTENCES + SENTENCES[:1], "sentence 3"),  # a third occurrence that is not there
        (["The capital of Italy is Rome.", "The capital of Italy is Rome."], "sentence 1"),
    ],
)
def test_bad_sentences_name_the_field(
    lm: LoadedModel, mask: torch.Tensor, sentences: list[str], needle: str
) -> None:
    with pytest.raises(InvalidParameter) as err:
        attribute(lm, DOCUMENT, sentences, SUMMARY, mask)
    assert err.value.field == "sentences" and needle in err.value.message


@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(2, 3),
        torch.ones(4),
        torch.ones(1, 2, 4),
        torch.full((2, 4), 1.5),
        -torch.ones(2, 4),
        torch.full((2, 4), math.nan),
    ],
)
def test_bad_mask_names_the_field(lm: LoadedModel, bad: torch.Tensor) -> None:
    with pytest.raises(InvalidParameter) as err:
        attribute(lm, DOCUMENT, SENTENCES, SUMMARY, bad)
    assert err.value.field == "facilitating_mask"


def test_other_bad_input(lm: LoadedModel, mask: torch.Tensor) -> None:
    for kwargs, field in [
        ({"aggregate": "median"}, "aggregate"),
        ({"normalize": "sum"}, "normalize"),
        ({"loss": "max"}, "loss"),
        ({"target_join": "glue"}, "target_join"),
        ({"summary": " "}, "summary"),
        ({"document": ""}, "document"),
    ]:
        args = {"document": DOCUMENT, "summary": SUMMARY, **kwargs}
        with pytest.raises(InvalidParameter) as err:
            attribute(lm, args.pop("document"), SENTENCES, args.pop("summary"), mask, **args)
        assert err.value.field == field


def test_works_when_the_caller_is_in_inference_mode(lm: LoadedModel, mask: torch.Tensor) -> None:
    expected = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, mask).summary["scores"]
    with torch.inference_mode():
        frozen_mask = mask.clone()
        got = attribute(lm, DOCUMENT, SENTENCES, SUMMARY, frozen_mask, checkpoint_above=1)
    assert got.summary["scores"] == pytest.approx(expected, rel=1e-5)
