"""Causal Head Gating: the updates against hand-written autograd, reproducibility,
cancellation, validation, and the causal effect of the heads it finds on the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from workers.lens.ablation import ablate
from workers.lens.adapters import adapt
from workers.lens.chg import fit_chg
from workers.lens.demo import copy_task_examples
from workers.lens.errors import Cancelled, InvalidParameter
from workers.lens.gated_forward import gated_logits
from workers.lens.loading import LoadedModel, load_model
from workers.lens.results import Progress
from workers.lens.taxonomy import HeadRole, heads_to_keep
from workers.lens.testing import build_tiny_model

PROMPTS = ["The capital of France is", "One two three", "a b a. c d"]
TARGETS = [" Paris.", " four five", " c."]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model("llama", tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def tiny(tiny_path: str) -> LoadedModel:
    return load_model(tiny_path)


class Reference:
    """The CHG objective written out independently: one unbatched forward pass per
    example and gate set, with each head's W_O input columns scaled by its gate."""

    def __init__(self, path: str, prompts: list[str], targets: list[str], tokenizer) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.adapter = adapt(self.model)
        names = {module: name for name, module in self.model.named_modules()}
        self.weights = [names[b.o_proj] + ".weight" for b in self.adapter.blocks]
        self.examples = []
        for prompt, target in zip(prompts, targets, strict=True):
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = tokenizer(prompt + target)["input_ids"]
            assert ids[: len(prompt_ids)] == prompt_ids, "the test needs a clean boundary"
            self.examples.append((torch.tensor([ids]), len(prompt_ids)))

    def nll(self, gates: torch.Tensor) -> torch.Tensor:
        """Mean over examples of the mean target-token NLL, for gates [layers, heads]."""
        head_dim = self.adapter.head_dim
        params = {
            name: self.adapter.blocks[layer].o_proj.weight
            * gates[layer].repeat_interleave(head_dim)[None, :]
            for layer, name in enumerate(self.weights)
        }
        losses = []
        for ids, start in self.examples:
            logits = functional_call(self.model, params, (ids,)).logits[0]
            logp = logits[start - 1 : -1].log_softmax(-1).gather(1, ids[0, start:, None])
            losses.append(-logp.mean())
        return torch.stack(losses).mean()

    def fit(
        self, logits: torch.Tensor, weights: list[float], updates: int, lr: float, lr_end: float
    ) -> tuple[torch.Tensor, list[float]]:
        """``updates`` Adam steps of every gate set, each with its own clipped gradient."""
        logits = logits.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=lr)
        nlls = []
        for update in range(updates):
            optimizer.param_groups[0]["lr"] = lr + (lr_end - lr) * update / updates
            grads, step_nll = [], []
            for s, weight in enumerate(weights):
                nll = self.nll(logits[s].sigmoid())
                loss = nll - weight * logits[s].clamp(-4, 4).mean()
                (grad,) = torch.autograd.grad(loss, logits, retain_graph=False)
                grads.append(grad[s] * min(1.0, 1.0 / (grad[s].norm().item() + 1e-6)))
                step_nll.append(nll.item())
            logits.grad = torch.stack(grads)
            optimizer.step()
            nlls.append(sum(step_nll) / len(step_nll))
        return logits.detach(), nlls


def test_updates_match_hand_written_autograd(tiny: LoadedModel, tiny_path: str) -> None:
    masks, l1, lr, lr_end = 2, 0.3, 0.5, 0.1
    result = fit_chg(
        tiny, PROMPTS, TARGETS, num_masks=masks, num_updates=2, num_reg_updates=2,
        batch_size=8, l1_weight=l1, lr=lr, lr_end=lr_end, seed=7,
    )  # fmt: skip
    ref = Reference(tiny_path, PROMPTS, TARGETS, tiny.tokenizer)
    shape = (masks, tiny.adapter.num_layers, tiny.adapter.num_heads)
    start = torch.logit(torch.rand(shape, generator=torch.Generator().manual_seed(7)), eps=1e-6)
    none, none_nll = ref.fit(start, [0.0] * masks, 2, lr, lr_end)
    joint, joint_nll = ref.fit(torch.cat([none, none]), [l1] * masks + [-l1] * masks, 2, lr, lr_end)
    t = result.tensors
    torch.testing.assert_close(t["masks.none"], none.sigmoid(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t["masks.positive"], joint[:masks].sigmoid(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t["masks.negative"], joint[masks:].sigmoid(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t["nll.none"], torch.tensor(none_nll), rtol=1e-4, atol=1e-5)
    assert t["nll.positive"].shape == t["nll.negative"].shape == (2,)
    torch.testing.assert_close(
        (t["nll.positive"] + t["nll.negative"]) / 2, torch.tensor(joint_nll), rtol=1e-4, atol=1e-5
    )


def test_result_tensors_and_summary(tiny: LoadedModel) -> None:
    reports: list[Progress] = []
    result = fit_chg(
        tiny, PROMPTS, TARGETS, num_masks=3, num_updates=4, num_reg_updates=3, batch_size=2,
        seed=1, record_history=True, progress=reports.append,
    )  # fmt: skip
    t, s = result.tensors, result.summary
    layers, heads = tiny.adapter.num_layers, tiny.adapter.num_heads
    for name in ("masks.none", "masks.positive", "masks.negative", "scores.facilitation"):
        assert t[name].shape == (3, layers, heads) and t[name].dtype == torch.float32
    torch.testing.assert_close(t["scores.facilitation"], t["masks.negative"])
    torch.testing.assert_close(t["scores.interference"], 1 - t["masks.positive"])
    torch.testing.assert_close(
        t["scores.irrelevance"], t["masks.positive"] * (1 - t["masks.negative"])
    )
    assert t["taxonomy"].dtype == torch.int8 and t["taxonomy"].shape == (layers, heads)
    assert t["history.none"].shape == (4, 3, layers, heads)
    assert t["history.positive"].shape == t["history.negative"].shape == (3, 3, layers, heads)
    torch.testing.assert_close(t["history.none"][-1], t["masks.none"])
    torch.testing.assert_close(t["history.negative"][-1], t["masks.negative"])
    assert [(r.stage, r.step, r.total) for r in reports] == [
        ("none", 1, 4), ("none", 2, 4), ("none", 3, 4), ("none", 4, 4),
        ("positive+negative", 1, 3), ("positive+negative", 2, 3), ("positive+negative", 3, 3),
    ]  # fmt: skip
    assert [r.loss for r in reports[:4]] == pytest.approx(t["nll.none"].tolist())
    joint = ((t["nll.positive"] + t["nll.negative"]) / 2).tolist()
    assert [r.loss for r in reports[4:]] == pytest.approx(joint)
    codes = t["taxonomy"].tolist()
    assert s["roles"] == [[HeadRole(c).label for c in row] for row in codes]
    assert sum(s["role_counts"].values()) == layers * heads
    assert set(s["mask_counts"]) == {"facilitating", "interfering", "irrelevant"}
    assert all(0 <= n <= 3 for row in s["mask_counts"]["facilitating"] for n in row)
    assert s["final_nll"]["none"] == pytest.approx(t["nll.none"][-1].item())
    assert s["seed"] == 1
    assert json.loads(json.dumps(s)) == s


def test_same_seed_same_gates(tiny: LoadedModel) -> None:
    def fit(seed: int) -> dict[str, torch.Tensor]:
        kwargs = {"num_masks": 2, "num_updates": 3, "num_reg_updates": 2, "batch_size": 2}
        return fit_chg(tiny, PROMPTS, TARGETS, seed=seed, **kwargs).tensors

    first, again, other = fit(11), fit(11), fit(12)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["masks.none"], other["masks.none"])


def test_accumulated_micro_batches_average(tiny: LoadedModel) -> None:
    kwargs = {"num_masks": 2, "num_updates": 2, "num_reg_updates": 1, "batch_size": 8, "seed": 3}
    plain = fit_chg(tiny, PROMPTS, TARGETS, **kwargs).tensors
    accumulated = fit_chg(tiny, PROMPTS, TARGETS, gradient_accum_steps=3, **kwargs).tensors
    for name in ("masks.none", "masks.negative", "nll.none"):
        torch.testing.assert_close(accumulated[name], plain[name], rtol=1e-5, atol=1e-6)


def test_without_regularised_updates_all_stages_share_the_gates(tiny: LoadedModel) -> None:
    t = fit_chg(
        tiny, PROMPTS, TARGETS, num_masks=2, num_updates=2, num_reg_updates=0, seed=0
    ).tensors
    assert torch.equal(t["masks.positive"], t["masks.none"])
    assert t["nll.negative"].shape == (0,)


def test_cancelling_stops_within_one_update(tiny: LoadedModel) -> None:
    calls = []
    handle = tiny.model.register_forward_hook(lambda *_: calls.append(1))
    reports: list[Progress] = []

    def progress(report: Progress) -> None:
        reports.append(report)
        if report.step == 3:
            raise Cancelled("cancelled by the test")

    try:
        with pytest.raises(Cancelled):
            fit_chg(tiny, PROMPTS, TARGETS, num_masks=2, num_updates=50, seed=0, progress=progress)
    finally:
        handle.remove()
    assert len(reports) == 3
    assert len(calls) <= 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_masks": 0}, "num_masks"),
        ({"num_updates": 0}, "num_updates"),
        ({"num_reg_updates": -1}, "num_reg_updates"),
        ({"batch_size": 0}, "batch_size"),
        ({"gradient_accum_steps": 0}, "gradient_accum_steps"),
        ({"l1_weight": -0.1}, "l1_weight"),
        ({"lr": 0.0}, "lr"),
        ({"lr_end": -1.0}, "lr_end"),
        ({"threshold": 1.5}, "threshold"),
        ({"targets": [" a", " b"]}, "targets"),
        ({"targets": [" a", "", " c"]}, "targets"),
        ({"prompts": []}, "texts"),
    ],
)
def test_invalid_parameters(tiny: LoadedModel, kwargs: dict, field: str) -> None:
    options = {"num_updates": 1, **kwargs}
    prompts = options.pop("prompts", PROMPTS)
    targets = options.pop("targets", TARGETS if prompts else [])
    with pytest.raises(InvalidParameter) as err:
        fit_chg(tiny, prompts, targets, **options)
    assert err.value.field == field


@pytest.fixture(scope="module")
def demo(demo_model_dir: Path) -> LoadedModel:
    return load_model(str(demo_model_dir))


def test_facilitating_heads_carry_the_copy_task(demo: LoadedModel) -> None:
    prompts, targets = copy_task_examples(64, seed=21)
    result = fit_chg(
        demo, prompts, targets, num_masks=2, num_updates=30, num_reg_updates=30,
        batch_size=16, seed=0,
    )  # fmt: skip
    g_plus, g_minus = result.tensors["masks.positive"], result.tensors["masks.negative"]
    held_out = copy_task_examples(48, seed=22)
    removed = heads_to_keep(g_plus, g_minus, "remove_facilitating", 0.5)
    sufficient = heads_to_keep(g_plus, g_minus, "sufficient", 0.5)
    assert removed.sum() < removed.numel(), "no facilitating head was found"
    without = ablate(demo, *held_out, removed).summary
    kept = ablate(demo, *held_out, sufficient).summary
    assert without["baseline_accuracy"] > 0.9
    assert without["masked_nll"] > without["baseline_nll"] + 2.0
    assert without["masked_accuracy"] < 0.5
    assert kept["masked_nll"] < kept["baseline_nll"] + 0.25
    assert kept["masked_accuracy"] > kept["baseline_accuracy"] - 0.1
    # Each fit's own sub-circuit (its gates under removal pressure) is sufficient too.
    for g in g_minus:
        own = ablate(demo, *held_out, (g >= 0.5).float()).summary
        assert own["masked_nll"] < own["baseline_nll"] + 0.5
        assert own["masked_accuracy"] > own["baseline_accuracy"] - 0.1


def test_bf16_weights_fit_like_fp32(demo_model_dir: Path) -> None:
    """Target log-probs come from an fp32 LM head, so a bf16 model's fit ends where the
    fp32 one does (in bf16 a logit near 20 is a multiple of 0.125)."""
    prompts, targets = copy_task_examples(32, seed=21)
    final = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(str(demo_model_dir), dtype=dtype)
        assert lm.dtype == getattr(torch, dtype)
        # Full batches: the final NLL is the data's, not one mini-batch's.
        result = fit_chg(
            lm, prompts, targets, num_masks=2, num_updates=30, num_reg_updates=30,
            batch_size=32, seed=0,
        )  # fmt: skip
        final[dtype] = result.summary["final_nll"]
    for stage in ("none", "positive", "negative"):
        assert abs(final["bfloat16"][stage] - final["float32"][stage]) < 0.02, final


def test_the_result_holds_roles_per_mask_and_their_consensus(tiny: LoadedModel) -> None:
    result = fit_chg(tiny, PROMPTS, TARGETS, num_masks=3, num_updates=3, num_reg_updates=3, seed=2)
    t, s = result.tensors, result.summary
    layers, heads = tiny.adapter.num_layers, tiny.adapter.num_heads
    assert t["mask_roles"].shape == (3, layers, heads) and t["mask_roles"].dtype == torch.int8
    assert t["gate_signal"].shape == (3, layers, heads) and bool((t["gate_signal"] >= 0).all())
    assert t["taxonomy_agreement"].shape == (layers, heads)
    shares = (t["mask_roles"] == t["taxonomy"][None]).float().mean(dim=0)
    torch.testing.assert_close(t["taxonomy_agreement"], shares)
    assert s["consensus"] == 0.5 and s["role_codes"]["undetermined"] == 4
    assert s["taxonomy_agreement"] == [[round(float(a), 4) for a in row] for row in shares]
    with pytest.raises(InvalidParameter) as err:
        fit_chg(tiny, PROMPTS, TARGETS, num_updates=1, consensus=0.3)
    assert err.value.field == "consensus"


def test_word_targets_with_or_without_their_space_fit_the_same_circuit(demo: LoadedModel) -> None:
    """Targets as the seed's users write them ("dog") and as continuations (" dog")."""
    prompts, targets = copy_task_examples(16, seed=4)
    fits = [
        fit_chg(
            demo,
            prompts,
            [" " + t if spaced else t for t in targets],
            num_masks=1,
            num_updates=3,
            num_reg_updates=3,
            batch_size=8,
            seed=0,
        )
        for spaced in (False, True)
    ]
    assert not targets[0].startswith(" ")
    for name in ("masks.positive", "masks.negative", "taxonomy"):
        assert torch.equal(fits[0].tensors[name], fits[1].tensors[name])


def test_the_lm_head_computes_in_fp32_for_a_bf16_model(tiny_path: str) -> None:
    lm = load_model(tiny_path, dtype="bfloat16")
    ids = lm.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    gates = torch.ones(1, lm.adapter.num_layers, lm.adapter.num_heads)
    with torch.no_grad():
        logits = gated_logits(lm, ids, gates, ids.shape[1], torch.arange(ids.shape[1])[None])
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.bfloat16().float())  # not bf16 values upcast
    assert "forward" not in lm.adapter.lm_head.__dict__  # the model is left as it was
