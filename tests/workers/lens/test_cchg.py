"""Contrastive CHG on a model built so that one cue's copy needs a head the other's does not.

The model sees ``<s> x1 x2 x3 x4 x5 CUE`` and must answer x1 after cue A and x5 after cue B.
It is trained in two phases. First with the B head gated off and all weights trainable:
cue A is solved by the other (A) heads, and cue B answers with an even spread over the
words. Then with only the B head's attention weights (its rows of W_Q, W_K, W_V and columns
of W_O) trainable, on both cues: cue B can only be solved by the B head, while cue A is kept
working with it on. Which head serves which cue is thus known by construction, and the test
checks it by ablation before fitting.

In both phases the heads that serve the cue are opened by a random gate g per example, and
the target is x with weight g and the even spread with weight 1 − g. Each head's effect on
its cue's log-probability is thus graded rather than all-or-nothing, as in a large model,
so that the gradients of the gate fit are informative.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from workers.lens.ablation import ablate
from workers.lens.adapters import adapt
from workers.lens.cchg import ContrastPairs, fit_cchg
from workers.lens.errors import Cancelled, InvalidParameter
from workers.lens.gating import head_gates
from workers.lens.loading import LoadedModel
from workers.lens.results import Progress

WORDS = [f"w{i}" for i in range(16)]
SPECIALS = ["<pad>", "<s>", "<unk>", "A", "B"]
HEADS, HEAD_DIM, SPAN = 4, 8, 5
B_HEADS = [3]
CUE_A, CUE_B = SPECIALS.index("A"), SPECIALS.index("B")
STEPS = 150


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )


def _batch(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [size, 7] and targets [size]; cue 0 is A (copy x1), 1 is B (copy x5)."""
    words = torch.rand(size, len(WORDS), generator=gen).argsort(dim=1)[:, :SPAN] + len(SPECIALS)
    cue = torch.randint(2, (size,), generator=gen)
    target = torch.where(cue == 0, words[:, 0], words[:, -1])
    ids = torch.cat([torch.ones(size, 1, dtype=torch.long), words, (CUE_A + cue)[:, None]], dim=1)
    return ids, target


def _train(
    model: LlamaForCausalLM,
    params: list[torch.nn.Parameter],
    trainable: list[torch.Tensor],
    steps: int,
    lr: float,
    gen: torch.Generator,
    *,
    first_phase: bool,
) -> None:
    """Adam on ``params``, their gradients multiplied by the ``trainable`` masks."""
    optimizer = torch.optim.Adam(params, lr=lr)
    words = torch.arange(len(SPECIALS), len(SPECIALS) + len(WORDS))
    adapter = adapt(model)
    a_heads = [h for h in range(HEADS) if h not in B_HEADS]
    for _ in range(steps):
        ids, target = _batch(128, gen)
        is_b = ids[:, -1] == CUE_B
        opened = torch.rand(128, generator=gen)
        a_gate = opened if first_phase else torch.ones(128)
        b_gate = torch.zeros(128) if first_phase else opened
        gates = torch.ones(128, 1, HEADS)
        gates[:, 0, a_heads] = a_gate[:, None]
        gates[:, 0, B_HEADS] = b_gate[:, None]
        with head_gates(adapter, gates):
            logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        logp = logits.log_softmax(-1)
        nll = -logp.gather(1, target[:, None])[:, 0]
        spread = -logp[:, words].mean(-1)
        sure = torch.where(is_b, b_gate, a_gate)
        loss = sure * nll + (1 - sure) * spread
        loss.mean().backward()
        for param, keep in zip(params, trainable, strict=True):
            param.grad.mul_(keep)
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def cued() -> LoadedModel:
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    _train(model, params, [torch.ones(())] * len(params), STEPS, 1e-2, gen, first_phase=True)
    attn = adapt(model).blocks[0].attention
    rows = torch.zeros(HEADS * HEAD_DIM, 1)
    for head in B_HEADS:
        rows[head * HEAD_DIM : (head + 1) * HEAD_DIM] = 1
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight]
    _train(model, params, [rows, rows, rows, rows.T], STEPS, 2e-2, gen, first_phase=False)
    model.eval().requires_grad_(False)
    return LoadedModel(
        source="cued-copy", model=model, tokenizer=tokenizer, adapter=adapt(model),
        device=torch.device("cpu"), dtype=torch.float32,
    )  # fmt: skip


def _texts(n: int, cue: str, seed: int) -> tuple[list[str], list[str]]:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.rand(n, len(WORDS), generator=gen).argsort(dim=1)[:, :SPAN].tolist()
    prompts = [" ".join(WORDS[i] for i in row) + f" {cue}" for row in rows]
    targets = [" " + WORDS[row[0] if cue == "A" else row[-1]] for row in rows]
    return prompts, targets


def _pairs(n: int, seed: int) -> ContrastPairs:
    """Retain cue A, forget cue B, on the same words."""
    retain, forget = _texts(n, "A", seed), _texts(n, "B", seed)
    return ContrastPairs(*retain, *forget)


def test_the_b_head_serves_cue_b_only(cued: LoadedModel) -> None:
    pairs = _pairs(64, seed=1)
    off = torch.ones(1, HEADS)
    off[0, B_HEADS] = 0
    a = ablate(cued, pairs.retain_prompts, pairs.retain_targets, off).summary
    b = ablate(cued, pairs.forget_prompts, pairs.forget_targets, off).summary
    assert a["baseline_accuracy"] > 0.95 and b["baseline_accuracy"] > 0.9
    assert a["masked_accuracy"] > 0.95
    assert b["masked_accuracy"] < 0.4


def test_contrastive_gates_forget_cue_b_and_keep_cue_a(cued: LoadedModel) -> None:
    train, held_out = _pairs(64, seed=2), _pairs(48, seed=3)
    reports: list[Progress] = []
    # λ multiplies the mean clamped logit over all heads, so its pull on one head is λ/heads:
    # 0.02 on these 4 heads is the per-head pull of the default 0.1 on a 20-head model.
    result = fit_cchg(
        cued, train.retain_prompts, train.retain_targets, train.forget_prompts,
        train.forget_targets, eval_pairs=held_out, num_masks=3, num_updates=150, batch_size=32,
        l1_weight=0.02, seed=0, progress=reports.append,
    )  # fmt: skip
    masks = result.tensors["masks.contrastive"]
    assert masks.shape == (3, 1, HEADS)
    assert result.tensors["nll.retain"].shape == result.tensors["nll.forget"].shape == (150,)
    assert [r.step for r in reports if r.stage == "contrastive"] == list(range(1, 151))
    summary = result.summary
    assert summary["evaluated_on"] == "eval" and summary["num_pairs"] == 48
    everything = summary["all_heads"]
    assert everything["retain_accuracy"] > 0.95 and everything["forget_accuracy"] > 0.9
    for gated, mask in zip(summary["gated"], masks, strict=True):
        assert gated["retain_accuracy"] > everything["retain_accuracy"] - 0.05
        assert gated["forget_accuracy"] < 0.4
        assert gated["forget_logprob"] < everything["forget_logprob"] - 2
        binary = (mask >= 0.5).float()
        assert gated["heads_on"] == int(binary.sum())
        retain = ablate(cued, held_out.retain_prompts, held_out.retain_targets, binary).summary
        forget = ablate(cued, held_out.forget_prompts, held_out.forget_targets, binary).summary
        assert gated["retain_accuracy"] == pytest.approx(retain["masked_accuracy"])
        assert gated["forget_accuracy"] == pytest.approx(forget["masked_accuracy"])
        assert gated["retain_logprob"] == pytest.approx(-retain["masked_nll"], rel=1e-4, abs=1e-5)
        assert gated["forget_logprob"] == pytest.approx(-forget["masked_nll"], rel=1e-4, abs=1e-5)
        assert everything["forget_logprob"] == pytest.approx(-forget["baseline_nll"], rel=1e-4)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["gated_mean"]["forget_accuracy"] == pytest.approx(
        sum(g["forget_accuracy"] for g in summary["gated"]) / 3
    )
    # The authors' evaluation: the fitted gates as they are, per-token accuracy.
    for continuous, mask in zip(summary["continuous"], masks, strict=True):
        assert continuous["forget_token_accuracy"] < 0.4
        assert continuous["retain_token_accuracy"] > everything["retain_token_accuracy"] - 0.05
        forget = ablate(cued, held_out.forget_prompts, held_out.forget_targets, mask).summary
        assert continuous["forget_logprob"] == pytest.approx(-forget["masked_nll"], rel=1e-4)
    assert summary["continuous_mean"]["forget_token_accuracy"] == pytest.approx(
        sum(c["forget_token_accuracy"] for c in summary["continuous"]) / 3
    )


def test_without_eval_pairs_the_training_pairs_are_evaluated(cued: LoadedModel) -> None:
    train = _pairs(8, seed=4)
    result = fit_cchg(cued, *vars(train).values(), num_updates=2, batch_size=4, seed=1)
    assert result.summary["evaluated_on"] == "train" and result.summary["num_pairs"] == 8
    again = fit_cchg(cued, *vars(train).values(), num_updates=2, batch_size=4, seed=1)
    assert torch.equal(result.tensors["masks.contrastive"], again.tensors["masks.contrastive"])


def test_cancelling_stops_within_one_update(cued: LoadedModel) -> None:
    reports: list[Progress] = []

    def progress(report: Progress) -> None:
        reports.append(report)
        if report.step == 2:
            raise Cancelled("cancelled by the test")

    train = _pairs(8, seed=5)
    with pytest.raises(Cancelled):
        fit_cchg(cued, *vars(train).values(), num_updates=40, batch_size=4, progress=progress)
    assert [r.step for r in reports] == [1, 2]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"forget_prompts": ["w1 B"]}, "forget_texts"),
        ({"retain_targets": [" w1", ""]}, "retain_targets"),
        ({"forget_targets": [" w1"]}, "forget_targets"),
        ({"diff_clip": -1.0}, "diff_clip"),
        ({"lr_end": 0.0}, "lr_end"),
        ({"l1_weight": -0.1}, "l1_weight"),
        ({"num_masks": 0}, "num_masks"),
        ({"num_updates": 0}, "num_updates"),
        ({"eval_pairs": ContrastPairs(["w1 A"], [" w1"], ["w1 B"], [])}, "eval_forget_targets"),
        ({"eval_pairs": ContrastPairs(["w1 A"], [""], ["w1 B"], [" w1"])}, "eval_retain_targets"),
    ],
)
def test_invalid_inputs_name_the_field(cued: LoadedModel, change: dict, field: str) -> None:
    args = {
        "retain_prompts": ["w1 w2 A", "w3 w4 A"],
        "retain_targets": [" w1", " w3"],
        "forget_prompts": ["w1 w2 B", "w3 w4 B"],
        "forget_targets": [" w2", " w4"],
        "num_updates": 1,
    } | change
    with pytest.raises(InvalidParameter) as err:
        fit_cchg(cued, **args)
    assert err.value.field == field
