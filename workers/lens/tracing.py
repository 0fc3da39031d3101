"""Capture the named sites of a forward pass: the ``trace`` job, and a capture API for others.

Every site is read with forward hooks on the modules the adapter found, at the point
where the model itself produces or consumes the tensor (see ``docs/sites.md`` for what
each site means per block kind):

| site | hook |
|---|---|
| ``block_input`` | block pre-hook, first input |
| ``attn_o_proj_pre`` | attention output projection pre-hook, first input |
| ``attn_output`` | attention module output (first element of a tuple); its output
  projection's where the module adds the residual itself (BLOOM) |
| ``post_attn_residual`` | sequential blocks: first input of ``post_attn_source`` (the MLP's
  pre-norm, or the MLP itself in post-norm blocks); parallel blocks: block input + attention
  output, computed |
| ``mlp_input`` / ``mlp_output`` | MLP pre-hook / output (sparse MoE: the whole block; BLOOM and
  MPT, which add the residual inside the MLP: its down projection's output) |
| ``block_output`` | block output (first element of a tuple) |
| ``final_norm`` / ``lm_head_input`` | final norm output / LM head pre-hook |
| ``logits`` | computed after the pass: ``adapter.unembed(block_output)`` |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from workers.lens.adapters import BlockKind, BlockParts, ModelAdapter, first_output, first_tensor
from workers.lens.errors import InvalidParameter
from workers.lens.loading import DTYPES, LoadedModel
from workers.lens.padding import encode_texts, token_strings
from workers.lens.results import AnalysisResult
from workers.lens.sites import LAYER_SITES, MODEL_SITES, SITE_NAMES, SITES

CAPTURABLE_SITES: tuple[str, ...] = tuple(s for s in SITE_NAMES if s != "logits")
"""Sites :func:`record_sites` captures during a pass (``logits`` is derived afterwards)."""

Positions = Literal["all", "last"] | list[int]


def resolve_layers(adapter: ModelAdapter, layers: Sequence[int] | None) -> list[int]:
    """Sorted, de-duplicated layer indices (all layers when ``None``), each in [0, layers)."""
    if layers is None:
        return list(range(adapter.num_layers))
    if isinstance(layers, str | int) or not layers:
        raise InvalidParameter("layers", "must be a non-empty list of layer indices")
    bad: list[object] = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
    bad += [x for x in layers if isinstance(x, int) and not 0 <= x < adapter.num_layers]
    if bad:
        raise InvalidParameter(
            "layers", f"{bad} are not layer indices of this model (0 to {adapter.num_layers - 1})"
        )
    return sorted(set(layers))


def resolve_sites(sites: Sequence[str] | None, known: Sequence[str] = SITE_NAMES) -> list[str]:
    """De-duplicated site names in vocabulary order (all of ``known`` when ``None``)."""
    if sites is None:
        return list(known)
    if isinstance(sites, str) or not sites:
        raise InvalidParameter("sites", "must be a non-empty list of site names")
    unknown = [s for s in sites if s not in known]
    if unknown:
        raise InvalidParameter("sites", f"unknown sites {unknown}; known: {list(known)}")
    return [s for s in known if s in sites]


def position_index(attention_mask: torch.Tensor, positions: Positions) -> torch.Tensor | None:
    """[batch, k] absolute position per row to keep, or ``None`` for all positions.

    ``"last"`` is each row's last real token (k = 1). A list names positions of real
    tokens, the same for every row: ``0 <= p < n`` counts from the start and
    ``-n <= p < 0`` from each row's own end (``-1`` is the last real token), where
    ``n`` is the shortest text's token count, so no position ever lands on padding.
    """
    lengths = attention_mask.sum(dim=1)
    if positions == "all":
        return None
    if positions == "last":
        return (lengths - 1)[:, None]
    if isinstance(positions, str) or not isinstance(positions, list | tuple) or not positions:
        raise InvalidParameter("positions", "must be 'all', 'last' or a non-empty list of integers")
    shortest = int(lengths.min())
    bad: list[object] = [p for p in positions if isinstance(p, bool) or not isinstance(p, int)]
    bad += [p for p in positions if isinstance(p, int) and not -shortest <= p < shortest]
    if bad:
        raise InvalidParameter(
            "positions",
            f"{bad} are out of range: the shortest text has {shortest} tokens, so positions must "
            f"be in [{-shortest}, {shortest - 1}] (negative ones count from each text's end)",
        )
    wanted = torch.tensor(positions, device=attention_mask.device)
    return torch.where(wanted < 0, lengths[:, None] + wanted, wanted.expand(len(lengths), -1))


def select_positions(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[batch, seq, *rest] → [batch, k, *rest] at ``index`` [batch, k] (moved to ``t``'s
    device: a model spread over several devices has sites on each)."""
    index = index.to(t.device)
    gather_index = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, gather_index)


@contextmanager
def record_sites(
    adapter: ModelAdapter,
    layers: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
    *,
    detach: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Fill a dict with the sites of every forward pass run inside the context.

    Keys are ``<site>.<layer>`` for layer sites and ``<site>`` for model sites, tensors
    [batch, seq, width] on the model's device in its dtype; a second pass overwrites
    the first. ``sites`` are taken from :data:`CAPTURABLE_SITES` (default all of them).

    ``detach=True`` stores detached copies. ``detach=False`` stores the live tensors
    of the autograd graph, for ``torch.autograd.grad(target, captured[name])``:

    - the input embeddings' output is made to require grad, so every site is in the
      graph even though the weights are frozen (run the pass with grad enabled);
    - each captured tensor is the one the model uses downstream. Module outputs
      (``attn_output``, ``mlp_output``, ``block_output``, ``final_norm``) are passed on
      as clones so that in-place updates later in the block (Falcon adds into its MLP
      output) cannot change the captured value; gradients flow through the clone;
    - ``post_attn_residual`` of a sequential block is the tensor the MLP's pre-norm
      receives, which the block also adds the MLP output to. In a parallel block that
      residual never exists, so a leaf equal to block input + attention output is
      stored and added to the block output as an exact zero (``leaf - leaf.detach()``):
      its gradient is the gradient of the block output, and nothing else changes.

    Hooks run in registration order: open ``head_gates`` first to capture gated
    ``attn_o_proj_pre`` values, after it to capture ungated ones.
    """
    recorder = _Recorder(
        resolve_layers(adapter, layers), resolve_sites(sites, CAPTURABLE_SITES), detach, None
    )
    with recorder.attached(adapter):
        yield recorder.captured


def trace(
    lm: LoadedModel,
    texts: list[str],
    *,
    layers: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
    positions: Positions = "all",
    dtype: str = "float32",
) -> AnalysisResult:
    """Run ``texts`` once and return the requested sites (all layers and sites by default).

    Tensors: ``<site>.<layer>`` / ``<site>`` [batch, k, width] in ``dtype``, where k is
    the padded length for ``positions="all"``, 1 for ``"last"`` and ``len(positions)``
    for a list; ``final_logits`` [batch, k, vocab] float32 at the same positions;
    ``input_ids`` and ``attention_mask`` [batch, seq] (always whole); and, unless all
    positions are kept, ``positions`` [batch, k] int64, the position of each kept slot.
    ``logits.<layer>`` is that block's output through final norm, LM head and the
    model's logit transform (softcapping, scaling): for the last layer, ``final_logits``.

    Memory scales with what is returned: sites are cut to the kept positions as they are
    captured, the LM head runs only at those positions, and each layer's logits are
    projected, cast to ``dtype`` and moved to the CPU before the next layer's are made,
    so at most one layer's full-precision logits exist beside the result.
    """
    if dtype not in DTYPES:
        raise InvalidParameter("dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
    adapter = lm.adapter
    layer_ids = resolve_layers(adapter, layers)
    site_names = resolve_sites(sites)
    batch = encode_texts(lm.tokenizer, texts, lm.device, lm.max_context)
    index = position_index(batch.attention_mask, positions)
    captured = [s for s in site_names if s != "logits"]
    if "logits" in site_names and "block_output" not in captured:
        captured.append("block_output")
    keep = None if index is None else (lambda t: select_positions(t, index))
    recorder = _Recorder(layer_ids, captured, True, keep)
    out_dtype = DTYPES[dtype]
    result: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        with recorder.attached(adapter), lm_head_at(adapter, index):
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        final = returned(logits, torch.float32)
        del logits
        store = recorder.captured
        for site in site_names:
            for layer in layer_ids if site in LAYER_SITES else [None]:
                name = SITES[site].tensor_name(layer)
                if site == "logits":
                    tensor = adapter.unembed(store[f"block_output.{layer}"])
                else:
                    tensor = store[name]
                result[name] = returned(tensor, out_dtype)
                del tensor  # so that one layer's logits exist at a time, not two
    result["final_logits"] = final
    result["input_ids"] = batch.input_ids.cpu()
    result["attention_mask"] = batch.attention_mask.cpu()
    if index is not None:
        result["positions"] = index.cpu()
    summary = {
        "layers": layer_ids,
        "sites": site_names,
        "positions": positions,
        "dtype": dtype,
        "tokens": token_strings(lm.tokenizer, batch),
    }
    return AnalysisResult(tensors=result, summary=summary)


def returned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a result holds it: ``dtype``, on the CPU, contiguous (no copy when it is)."""
    return t.to(dtype).cpu().contiguous()


@contextmanager
def lm_head_at(adapter: ModelAdapter, index: torch.Tensor | None) -> Iterator[None]:
    """Feed the LM head only the positions ``index`` [batch, k] (all when ``None``), so that
    the model's logits are [batch, k, vocab] rather than a full [batch, seq, vocab] the
    caller would cut. The model's logit transform is elementwise and still applies.
    Enter it after any context whose LM head pre-hook must see every position."""
    if index is None:
        yield
        return

    def cut(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (select_positions(args[0], index), *args[1:])

    handle = adapter.lm_head.register_forward_pre_hook(cut)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class _LayerState:
    """Block input and attention output of the current pass, for parallel blocks."""

    block_input: torch.Tensor | None = None
    attn_output: torch.Tensor | None = None


@dataclass
class _Recorder:
    """Registers the hooks for some layers and sites and stores what they see."""

    layers: list[int]
    sites: list[str]
    detach: bool
    keep: Callable[[torch.Tensor], torch.Tensor] | None
    captured: dict[str, torch.Tensor] = field(default_factory=dict)

    @contextmanager
    def attached(self, adapter: ModelAdapter) -> Iterator[None]:
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            if not self.detach:
                handles.append(adapter.input_embeddings.register_forward_hook(_require_grad))
            for layer in self.layers:
                handles += self._layer_hooks(layer, adapter.blocks[layer])
            if "final_norm" in self.sites:
                handles.append(
                    adapter.final_norm.register_forward_hook(self._output_hook("final_norm"))
                )
            if "lm_head_input" in self.sites:
                handles.append(
                    adapter.lm_head.register_forward_pre_hook(
                        self._input_hook("lm_head_input"), with_kwargs=True
                    )
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _layer_hooks(
        self, layer: int, parts: BlockParts
    ) -> list[torch.utils.hooks.RemovableHandle]:
        wanted = set(self.sites) - set(MODEL_SITES)
        name = {site: SITES[site].tensor_name(layer) for site in wanted}
        parallel = parts.kind is BlockKind.PARALLEL and "post_attn_residual" in wanted
        state = _LayerState()
        inputs: list[tuple[nn.Module, str]] = []
        if "block_input" in wanted:
            inputs.append((parts.block, name["block_input"]))
        if "attn_o_proj_pre" in wanted:
            inputs.append((parts.o_proj, name["attn_o_proj_pre"]))
        if "post_attn_residual" in wanted and parts.post_attn_source is not None:
            inputs.append((parts.post_attn_source, name["post_attn_residual"]))
        if "mlp_input" in wanted:
            inputs.append((parts.mlp, name["mlp_input"]))
        handles = [
            module.register_forward_pre_hook(self._input_hook(key), with_kwargs=True)
            for module, key in inputs
        ]
        if "mlp_output" in wanted:
            handles.append(
                parts.mlp_writer.register_forward_hook(self._output_hook(name["mlp_output"]))
            )
        if parallel:
            handles.append(
                parts.block.register_forward_pre_hook(
                    lambda _m, args, kwargs: setattr(
                        state, "block_input", first_tensor(args, kwargs)
                    ),
                    with_kwargs=True,
                )
            )
            handles.append(
                parts.attn_writer.register_forward_hook(
                    lambda _m, _a, out: setattr(state, "attn_output", first_output(out))
                )
            )
        if "attn_output" in wanted:
            handles.append(
                parts.attn_writer.register_forward_hook(self._output_hook(name["attn_output"]))
            )
        if parallel:
            handles.append(
                parts.block.register_forward_hook(
                    self._parallel_residual_hook(state, name["post_attn_residual"])
                )
            )
        if "block_output" in wanted:
            handles.append(
                parts.block.register_forward_hook(self._output_hook(name["block_output"]))
            )
        return handles

    def _store(self, key: str, t: torch.Tensor) -> None:
        if not self.detach:
            self.captured[key] = t
            return
        t = t.detach()
        self.captured[key] = t.clone() if self.keep is None else self.keep(t)

    def _input_hook(self, key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = first_tensor(args, kwargs)
            if x is not None:
                self._store(key, x)

        return hook

    def _output_hook(self, key: str) -> Callable[..., Any]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            y = first_output(output)
            self._store(key, y)
            return None if self.detach else _replace_first(output, y.clone())

        return hook

    def _parallel_residual_hook(self, state: _LayerState, key: str) -> Callable[..., Any]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            if state.block_input is None or state.attn_output is None:
                raise RuntimeError(f"{key}: the block ran without its attention module")
            residual = state.block_input + state.attn_output
            state.block_input = state.attn_output = None
            if self.detach or not torch.is_grad_enabled():
                self._store(key, residual)
                return None
            leaf = residual.detach().requires_grad_()
            self._store(key, leaf)
            y = first_output(output)
            return _replace_first(output, y + (leaf - leaf.detach()))

        return hook


def _require_grad(_m: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> Any:
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_()
    return None


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value
