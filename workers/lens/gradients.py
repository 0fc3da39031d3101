"""Gradients in trace: how each traced activation moves the log-probability of a target.

For each text, with ``p`` its resolved position (``position`` counts from the
start when ≥ 0 and from the text's own last real token when < 0, so -1 is the
last token), the model reads the text's tokens ``0..p`` followed by the target
tokens ``t_1..t_m``, and the differentiated quantity is the teacher-forced

    log P(t_1..t_m | text[0..p]) = Σ_k log P(t_k | text[0..p], t_<k)

summed over the texts (texts do not interact, so each row's gradient is that of
its own target). A target text is tokenised as the continuation of the text up
to ``p`` (prefix + target as one string; the target's tokens are those whose
character span reaches into it), so each text may get its own target tokens;
``target_ids`` are used as given.

Gradients are reported at the text's positions, the same [batch, seq, width]
layout as the traced activations: positions ``0..p`` carry the gradient (paths
through the appended target tokens included); positions after ``p`` and padding
are zero, as the text's later tokens are not in the differentiated input. The
``logits`` site (the logit lens) is computed off the model's path and gets no
gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from workers.lens.errors import ContextTooLong, InvalidParameter
from workers.lens.loading import DTYPES, LoadedModel
from workers.lens.padding import TextBatch, encode_texts
from workers.lens.sites import LAYER_SITES, SITES
from workers.lens.tracing import (
    CAPTURABLE_SITES,
    Positions,
    lm_head_at,
    position_index,
    record_sites,
    resolve_layers,
    resolve_sites,
    returned,
    select_positions,
)

GRAD_PREFIX = "grad."


@torch.inference_mode(False)
def trace_gradients(
    lm: LoadedModel,
    texts: list[str],
    *,
    layers: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
    target: str | None = None,
    target_ids: list[int] | None = None,
    position: int = -1,
    positions: Positions = "all",
    dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """``grad.<site>.<layer>`` / ``grad.<site>`` [batch, k, width] in ``dtype`` for the traced
    sites, at the kept ``positions`` exactly as :func:`tracing.trace` keeps them.

    With all positions, k is the padded length of ``texts`` alone (as in ``trace``), so
    each gradient lines up with the activation of the same name. The LM head runs only
    at the positions that predict target tokens, and each gradient is cut, cast and
    moved to the CPU on its own.
    """
    if dtype not in DTYPES:
        raise InvalidParameter("dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
    adapter = lm.adapter
    layer_ids = resolve_layers(adapter, layers)
    on_path = [s for s in resolve_sites(sites) if s in CAPTURABLE_SITES]
    batch = encode_texts(lm.tokenizer, texts, lm.device, lm.max_context)
    index = position_index(batch.attention_mask, positions)
    ends = _resolve_positions(batch, position)
    targets = _target_tokens(lm, texts, batch, ends, target, target_ids)
    inputs, mask, target_at, target_tok, target_mask = _continued_batch(lm, batch, ends, targets)

    with (
        torch.enable_grad(),
        record_sites(adapter, layer_ids, on_path, detach=False) as captured,
        lm_head_at(adapter, target_at),
    ):
        picked = lm.model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
        log_probs = torch.log_softmax(picked.float(), dim=-1).gather(-1, target_tok[..., None])
        total = (log_probs[..., 0] * target_mask).sum()
        names = [
            SITES[s].tensor_name(layer)
            for s in on_path
            for layer in (layer_ids if s in LAYER_SITES else [None])
        ]
        grads: list[torch.Tensor | None] = list(
            torch.autograd.grad(total, [captured[n] for n in names], allow_unused=True)
        )
    del picked, log_probs, total

    seq = batch.input_ids.shape[1]
    shared = min(seq, inputs.shape[1])
    keep = (torch.arange(shared, device=lm.device)[None] <= ends[:, None]).float()[..., None]
    out_dtype = DTYPES[dtype]
    result = {}
    for i, name in enumerate(names):
        grad, grads[i] = grads[i], None
        width = captured[name].shape[-1]
        at_text = torch.zeros(len(texts), seq, width, device=keep.device)
        if grad is not None:
            at_text[:, :shared] = grad[:, :shared].float() * keep.to(grad.device)
        del grad
        if index is not None:
            at_text = select_positions(at_text, index)
        result[GRAD_PREFIX + name] = returned(at_text, out_dtype)
    return result


def _resolve_positions(batch: TextBatch, position: int) -> torch.Tensor:
    """[batch] the position each row's target follows."""
    lengths = batch.lengths
    if isinstance(position, bool) or not isinstance(position, int):
        raise InvalidParameter("gradients.position", f"must be an integer, got {position!r}")
    ends = torch.full_like(lengths, position) if position >= 0 else lengths + position
    bad = [
        i
        for i, (p, n) in enumerate(zip(ends.tolist(), lengths.tolist(), strict=True))
        if not 0 <= p < n
    ]
    if bad:
        raise InvalidParameter(
            "gradients.position",
            f"position {position} is outside texts {bad} (negative positions count from each "
            "text's last real token, -1 being that token)",
        )
    return ends


def _target_tokens(
    lm: LoadedModel,
    texts: list[str],
    batch: TextBatch,
    ends: torch.Tensor,
    target: str | None,
    target_ids: list[int] | None,
) -> list[list[int]]:
    """Each row's target token ids."""
    if (target is None) == (target_ids is None):
        raise InvalidParameter("gradients", "give exactly one of target and target_ids")
    if target_ids is not None:
        vocab = lm.adapter.vocab_size
        bad = [
            t
            for t in target_ids
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
        ]
        if not target_ids or bad:
            raise InvalidParameter(
                "gradients.target_ids",
                f"must be a non-empty list of token ids in [0, {vocab}); bad: {bad}",
            )
        return [list(target_ids)] * len(texts)
    if not target:
        raise InvalidParameter("gradients.target", "must not be empty")
    prefixes = _prefixes(lm.tokenizer, texts, batch, ends)
    rows = [_continuation(lm.tokenizer, prefix, target) for prefix in prefixes]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise InvalidParameter("gradients.target", f"gives no tokens after texts {empty}")
    return rows


def _prefixes(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], batch: TextBatch, ends: torch.Tensor
) -> list[str]:
    """Each text cut after the last character of its token at the resolved position."""
    if not tokenizer.is_fast:
        return [""] * len(texts)
    offsets = tokenizer(list(texts), return_offsets_mapping=True)["offset_mapping"]
    return [text[: offs[p][1]] for text, offs, p in zip(texts, offsets, ends.tolist(), strict=True)]


def _continuation(tokenizer: PreTrainedTokenizerBase, prefix: str, target: str) -> list[int]:
    """``target``'s tokens as the continuation of ``prefix`` (standalone without offsets)."""
    if not tokenizer.is_fast or not prefix:
        return tokenizer(target, add_special_tokens=False)["input_ids"]
    enc = tokenizer(prefix + target, add_special_tokens=True, return_offsets_mapping=True)
    cut = len(prefix)
    # A whitespace token trimmed to an empty span still counts: its span ends past the cut.
    return [
        tok
        for tok, (_, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        if end > cut
    ]


def _continued_batch(
    lm: LoadedModel, batch: TextBatch, ends: torch.Tensor, targets: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text tokens ``0..p`` then the target, right-padded: ids and mask [batch, len], and per
    target token [batch, m] the position predicting it, its id and whether it is real."""
    rows = [
        ids[: p + 1] + tgt
        for ids, p, tgt in zip(batch.input_ids.tolist(), ends.tolist(), targets, strict=True)
    ]
    longest = max(len(r) for r in rows)
    if lm.max_context is not None and longest > lm.max_context:
        raise ContextTooLong(
            "gradients",
            f"a text with its target takes {longest} tokens, more than the model's context of "
            f"{lm.max_context}",
        )
    pad = lm.tokenizer.pad_token_id or 0
    m = max(len(t) for t in targets)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    at = torch.zeros(len(rows), m, dtype=torch.long)
    tok = torch.zeros(len(rows), m, dtype=torch.long)
    real = torch.zeros(len(rows), m)
    for i, (row, p, tgt) in enumerate(zip(rows, ends.tolist(), targets, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        at[i, : len(tgt)] = torch.arange(p, p + len(tgt))
        tok[i, : len(tgt)] = torch.tensor(tgt)
        real[i, : len(tgt)] = 1
    device = lm.device
    return ids.to(device), mask.to(device), at.to(device), tok.to(device), real.to(device)
