"""Token scoring: the model's next-token logits for every position of every text."""

from __future__ import annotations

import math

import torch

from workers.lens.errors import InvalidParameter
from workers.lens.loading import LoadedModel
from workers.lens.padding import TextBatch, encode_texts, token_strings
from workers.lens.results import AnalysisResult


def score(
    lm: LoadedModel,
    texts: list[str],
    *,
    temperature: float = 1.0,
    final_token_only: bool = False,
    top_k: int | None = None,
) -> AnalysisResult:
    """Next-token logits of ``texts`` (right-padded into one batch), divided by ``temperature``.

    Tensors:

    - ``logits`` [batch, seq, vocab] float32 (left out when ``final_token_only`` or ``top_k``);
    - with ``top_k`` instead: ``top_k_logits`` [batch, seq, k] float32 and ``top_k_ids``
      [batch, seq, k] int64, the k largest logits per position in decreasing order;
    - ``final_token_logits`` [batch, vocab] float32: each text's last real token, always
      over the full vocabulary (a client derives the next-token distribution from it);
    - ``input_ids`` and ``attention_mask`` [batch, seq] int64.

    The summary gives each text's tokens (as strings, for display), its token count and
    the most likely next token with its probability at this temperature.
    """
    if isinstance(temperature, bool) or not (math.isfinite(temperature) and temperature > 0):
        raise InvalidParameter("temperature", f"must be a finite number > 0, got {temperature!r}")
    vocab = lm.adapter.vocab_size
    if top_k is not None and (isinstance(top_k, bool) or not 1 <= top_k <= vocab):
        raise InvalidParameter("top_k", f"must be an integer in [1, {vocab}], got {top_k!r}")
    batch = encode_texts(lm.tokenizer, texts, lm.device, lm.max_context)
    with torch.inference_mode():
        raw = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return from_logits(
            lm, batch, raw, temperature=temperature, final_token_only=final_token_only, top_k=top_k
        )


def from_logits(
    lm: LoadedModel,
    batch: TextBatch,
    raw: torch.Tensor,
    *,
    temperature: float,
    final_token_only: bool,
    top_k: int | None,
) -> AnalysisResult:
    """``score``'s result from the raw logits [batch, seq, vocab] of ``batch``; shared with
    the worker's cross-job batcher, so a batched job returns exactly what it would alone."""
    rows = torch.arange(batch.input_ids.shape[0], device=raw.device)
    tensors: dict[str, torch.Tensor] = {}
    final = raw[rows, batch.last_positions.to(raw.device)].float() / temperature
    if not final_token_only:
        if top_k is None:
            # x / 1.0 == x exactly: skip a copy of the largest tensor at the default temperature
            tensors["logits"] = raw.float() if temperature == 1 else raw.float() / temperature
        else:
            values, ids = raw.topk(top_k, dim=-1)
            tensors["top_k_logits"] = values.float() / temperature
            tensors["top_k_ids"] = ids
    best_prob, best_id = final.softmax(dim=-1).max(dim=-1)
    tensors |= {
        "final_token_logits": final,
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
    }
    summary = {
        "temperature": temperature,
        "final_token_only": final_token_only,
        "top_k": top_k,
        "tokens": token_strings(lm.tokenizer, batch),
        "texts": [
            {
                "num_tokens": n,
                "next_token": lm.tokenizer.decode([token]),
                "next_token_id": token,
                "next_token_prob": prob,
            }
            for n, token, prob in zip(
                batch.lengths.tolist(), best_id.tolist(), best_prob.tolist(), strict=True
            )
        ],
    }
    return AnalysisResult(
        tensors={k: v.detach().cpu().contiguous() for k, v in tensors.items()}, summary=summary
    )
