"""``lens demo``: the whole service on the demo model, showing what each analysis gives back.

It builds (once) a small Llama trained on word-sequence tasks (copy among them), starts
Redis, a worker and the API, then runs score, trace, chg and ablate jobs through the
Python client, as a user would, and prints their results: the heads' roles on the copy
task, then the ablations that check each role causally.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from app.client import ChgResult, LensClient, Model
from app.client.results import ROLE_CODES, ROLE_NAMES
from app.core.config import ModelSpec, Settings
from app.core.redis_server import free_port
from app.stack import Stack

MODEL = "demo"
ROLE_STYLE = {
    "facilitating": "bold green",
    "interfering": "bold red",
    "irrelevant": "dim",
    "inconsistent": "yellow",
    "undetermined": "italic",
}
CONFIRMS = {
    "interfering": "NLL must not rise",
    "facilitating": "NLL must rise",
    "irrelevant": "NLL rises far less than without the facilitating heads",
}


def run_demo(data_dir: Path, *, num_updates: int | None, console: Console) -> None:
    from workers.lens.demo import DEMO_CHG, DEMO_TEXTS, copy_task_examples, ensure_demo_model

    with console.status("building the demo model (once; cached afterwards)…"):
        started = time.perf_counter()
        model_dir = ensure_demo_model()
    console.print(f"demo model: {model_dir} ({time.perf_counter() - started:.1f} s)")
    settings = Settings(
        data_dir=data_dir,
        models={MODEL: ModelSpec(source=str(model_dir))},
        port=free_port(),
    )
    stack = Stack(settings)
    try:
        with console.status("starting Redis, a worker and the API…"):
            started = time.perf_counter()
            stack.start(workers=1)
            stack.wait_ready(timeout=300)
        console.print(f"lens-server up at {stack.url} in {time.perf_counter() - started:.1f} s")
        with LensClient(stack.url) as client:
            lens = client.model(MODEL)
            info = lens.info()
            console.print(
                f"model [bold]{MODEL}[/]: {info['architecture']}, {info['layers']} layers × "
                f"{info['heads']} heads, vocabulary {info['vocab_size']}, on {info['device']}"
            )
            _score(console, lens, list(DEMO_TEXTS))
            _trace(console, lens, DEMO_TEXTS[2])
            prompts, targets = copy_task_examples(DEMO_CHG["prompts"], seed=DEMO_CHG["data_seed"])
            updates = num_updates or DEMO_CHG["num_updates"]
            fit = _chg(console, lens, prompts, targets, updates, DEMO_CHG)
            held_out = copy_task_examples(200, seed=8)
            _ablate(console, lens, *held_out, fit)
    finally:
        with console.status("stopping…"):
            stack.stop()
    console.print(f"results and logs are under {data_dir}")


def _timed(console: Console, what: str, call: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = call()
    console.print(f"[dim]{what}: {time.perf_counter() - started:.2f} s round trip[/]")
    return result


def _score(console: Console, lens: Model, texts: list[str]) -> None:
    console.rule("score: the model's next token after each text")
    scores = _timed(console, "score job", lambda: lens.score(texts=texts, progress=False))
    probs = np.asarray(scores.final_token_probs())
    vocab = {i: t for t, i in _vocab(lens).items()}
    table = Table("text", "top next tokens (probability)")
    for text, row in zip(texts, probs, strict=True):
        top = np.argsort(row)[::-1][:3]
        table.add_row(text, ", ".join(f"{vocab.get(int(i), i)} {row[i]:.2f}" for i in top))
    console.print(table)


def _trace(console: Console, lens: Model, text: str) -> None:
    console.rule("trace: the logit lens, layer by layer, at the last token")
    trace = _timed(
        console,
        "trace job",
        lambda: lens.trace(texts=text, sites=["logits", "attn_o_proj_pre"], progress=False),
    )
    vocab = {i: t for t, i in _vocab(lens).items()}
    table = Table("layer", "top token", "probability", "attn_o_proj_pre shape")
    for layer in trace.layers("logits"):
        probs = np.asarray(trace.layer_probs(layer))[0, -1]
        best = int(probs.argmax())
        shape = tuple(np.asarray(trace.get("attn_o_proj_pre", layer)).shape)
        table.add_row(str(layer), vocab.get(best, str(best)), f"{probs[best]:.2f}", str(shape))
    console.print(f"text: {text!r}")
    console.print(table)


def _chg(
    console: Console,
    lens: Model,
    prompts: list[str],
    targets: list[str],
    num_updates: int,
    settings: dict[str, int],
) -> ChgResult:
    console.rule("chg: Causal Head Gating on the copy task")
    console.print(f"{len(prompts)} prompts such as {prompts[0]!r} → {targets[0]!r}")
    fit = _timed(
        console,
        "chg job",
        partial(
            lens.fit,
            texts=prompts,
            targets=targets,
            num_masks=settings["num_masks"],
            num_updates=num_updates,
            num_reg_updates=num_updates,
            batch_size=settings["batch_size"],
            seed=settings["seed"],
            progress=True,
        ),
    )
    roles = np.asarray(fit.taxonomy)
    agreement = np.asarray(fit.taxonomy_agreement)
    g_plus = np.asarray(fit.masks["positive"]).mean(0)
    g_minus = np.asarray(fit.masks["negative"]).mean(0)
    table = Table("layer", *[f"head {h}" for h in range(roles.shape[1])], title="consensus roles")
    for layer in range(roles.shape[0]):
        cells = []
        for head in range(roles.shape[1]):
            role = ROLE_NAMES[int(roles[layer, head])]
            cells.append(
                f"[{ROLE_STYLE[role]}]{role}[/] {agreement[layer, head]:.0%}\n"
                f"G+ {g_plus[layer, head]:.2f} G− {g_minus[layer, head]:.2f}"
            )
        table.add_row(str(layer), *cells)
    console.print(table)
    console.print(
        "role in more than half the masks (the share that agrees is shown); "
        "undetermined: no such role, or a gate the loss never pulled on"
    )
    console.print(f"roles: {fit.summary()['roles']}")
    console.print(f"final NLL per stage: {fit.summary().get('final_nll')}")
    return fit


def _ablate(
    console: Console, lens: Model, prompts: list[str], targets: list[str], fit: ChgResult
) -> None:
    console.rule("ablate: removing each group of heads, on held-out copy prompts")
    roles = np.asarray(fit.taxonomy)
    table = Table("heads removed", "count", "NLL all heads → removed", "accuracy", "check")
    deltas: dict[str, float] = {}
    for role, expect in CONFIRMS.items():
        off = roles == ROLE_CODES[role]
        if not off.any():
            table.add_row(role, "0", "", "", "no such head")
            continue
        res = _timed(
            console,
            f"ablate job (without the {role} heads)",
            partial(
                lens.ablate,
                texts=prompts,
                targets=targets,
                head_mask=(~off).astype(np.float32),
                progress=False,
            ),
        )
        s = res.job_summary
        delta = deltas[role] = s["masked_nll"] - s["baseline_nll"]
        confirmed = {
            "interfering": delta <= 0,
            "facilitating": delta > 0.1,
            "irrelevant": delta < deltas.get("facilitating", 0.0) / 4,
        }[role]
        table.add_row(
            role,
            str(int(off.sum())),
            f"{s['baseline_nll']:.3f} → {s['masked_nll']:.3f}",
            f"{s['baseline_accuracy']:.2f} → {s['masked_accuracy']:.2f}",
            f"{expect}: {'[green]yes[/]' if confirmed else '[red]no[/]'}",
        )
    console.print(table)


def _vocab(lens: Model) -> dict[str, int]:
    """The demo tokenizer's vocabulary (word-level), read from the model directory."""
    import json

    source = Path(lens.info()["source"])
    return json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
