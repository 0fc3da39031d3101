"""The seed library's README examples (``inteprelens`` 0.2.1), run against the demo through
the service: each changed only in its first line (``LensClient(url).model(name)`` for
``LensAPI.from_pretrained``) and where the seed's own example is wrong (its
``necessary_heads()`` returns a list, so the README's ``.head()`` on it fails in the seed
too: sliced here instead). The attribution example builds a ``CausalCircuitAttribution``
around a local model, which a remote service cannot hold; its service form is the
``attribute`` job with the same arguments."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np

from app.client import LensClient
from app.stack import Stack
from tests.conftest import DEMO


def _run(example: str, url: str) -> str:
    """Run an example's code with ``url`` bound, returning what it printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        exec(example, {"url": url, "DEMO": DEMO})
    return out.getvalue()


QUICK_START = """
from app.client import LensClient

analyzer = LensClient(url).model(DEMO)

results = analyzer.fit(
    texts=["What is the capital of France?"],
    targets=["Paris"],
    num_masks=1,
    num_updates=1,
    num_reg_updates=1,
    batch_size=1,
    verbose=False,
)

print(results.summary())
print(results.necessary_heads()[:5])
"""

CHG_ANALYSIS = """
from app.client import LensClient

analyzer = LensClient(url).model(DEMO)

results = analyzer.fit(
    texts=[
        "The capital of France is",
        "2 + 2 equals",
    ],
    targets=[
        "Paris",
        "4",
    ],
    num_masks=1,
    num_updates=1,
    num_reg_updates=1,
    batch_size=1,
    verbose=False,
)

necessary = results.necessary_heads()
taxonomy = results.head_taxonomy()

print(necessary[:5])
print(taxonomy.head())
"""

TRACE = """
from app.client import LensClient

analyzer = LensClient(url).model(DEMO)

trace = analyzer.trace(
    texts="Paris is the capital of",
    layers=[0],
    sites=["attn_o_proj_pre", "final_norm", "logits"],
)

print(trace.get("attn_o_proj_pre", 0).shape)
print(trace.get("logits", 0).shape)
print(trace.final_logits.shape)
"""

SCORE = """
from app.client import LensClient

analyzer = LensClient(url).model(DEMO)

scores = analyzer.score(
    texts=[
        "The capital of France is",
        "2 + 2 equals",
    ],
    temperature=1.0,
)

print(scores.logits.shape)
print(scores.log_probs.shape)
print(scores.probs.shape)

final_logits = scores.final_token_logits()
final_log_probs = scores.final_token_log_probs()
final_probs = scores.final_token_probs()

print(final_logits.shape)
print(final_log_probs.shape)
print(final_probs.shape)
"""

ATTRIBUTION = """
from app.client import LensClient

analyzer = LensClient(url).model(DEMO)

results = analyzer.fit(
    texts=["The capital of France is"],
    targets=["Paris"],
    num_masks=1,
    num_updates=1,
    num_reg_updates=1,
    batch_size=1,
    verbose=False,
)

facilitating_mask = results.get_facilitating_mask()

sentence_scores = analyzer.attribute(
    document="Paris is the capital of France. It is one of Europe's largest cities.",
    sentences=[
        "Paris is the capital of France.",
        "It is one of Europe's largest cities.",
    ],
    summary="Paris is the capital of France.",
    facilitating_mask=facilitating_mask,
).scores

print(sentence_scores)
"""


def test_quick_start_and_chg_analysis(service: Stack) -> None:
    printed = _run(QUICK_START, service.url)
    assert "'num_masks': 1" in printed
    printed = _run(CHG_ANALYSIS, service.url)
    assert "layer" in printed and "irrelevant_masks" in printed  # the taxonomy frame's header


def test_trace_and_score(service: Stack) -> None:
    with LensClient(service.url) as client:
        lens = client.model(DEMO)
        layers, heads = lens.num_layers, lens.num_heads
        vocab = lens.info()["vocab_size"]
    hidden = 64
    printed = _run(TRACE, service.url).split("\n")
    tokens = 1 + 5  # BOS and five (unknown) words
    assert [tuple(eval(line.removeprefix("torch.Size"))) for line in printed[:3]] == [
        (1, tokens, hidden),
        (1, tokens, vocab),
        (1, tokens, vocab),
    ]
    printed = _run(SCORE, service.url).split("\n")
    assert tuple(eval(printed[0].removeprefix("torch.Size")))[::2] == (2, vocab)
    assert [tuple(eval(line.removeprefix("torch.Size"))) for line in printed[3:6]] == [
        (2, vocab)
    ] * 3
    assert layers == 3 and heads == 8


def test_attribution_as_a_service_job(service: Stack) -> None:
    printed = _run(ATTRIBUTION, service.url)
    scores = eval(printed)
    assert len(scores) == 2
    finite = [s for s in scores if s is not None and np.isfinite(s)]
    assert not finite or max(finite) == 1.0  # divided by the largest, as the seed does
