"""Find the parts of a decoder-only causal LM that the analyses hook into.

Modules are found by name (a short list of the names transformers uses), and what
each block actually does with them is then observed, not assumed: :func:`adapt`
runs the model once on a few tokens with hooks on every block and reads the data
flow from tensor identity. That tells, per block, whether the MLP reads the
residual stream after the attention write (sequential) or the block input
(parallel: GPT-J, Phi, Cohere, Falcon, GPT-NeoX with ``use_parallel_residual``),
which module receives the post-attention residual, and which module's output is
each write (a submodule, in families that add the residual inside the attention or
MLP module). The same pass checks that the final norm and LM head reproduce the
model's logits, so the logit lens is exact. A model that cannot be adapted fails
here, at load, with an error naming what was not found. ``docs/sites.md`` lists
what each site means per block type.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from workers.lens.errors import ModelNotAdaptable

_BLOCK_LISTS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.blocks",
    "gpt_neox.layers",
    "model.decoder.layers",
)
_ATTENTION = ("self_attn", "attn", "attention", "self_attention", "mixer")
_O_PROJ = ("o_proj", "dense", "c_proj", "out_proj", "wo")
_MLP = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe")
_FINAL_NORM = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
_NUM_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_NUM_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
_NUM_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Families whose ``logits_scaling`` multiplies the logits (Granite and MiniCPM divide by it).
_MULTIPLYING_LOGITS_SCALING = frozenset({"hyperclovax", "hyperclovax_vision_v2"})


class BlockKind(StrEnum):
    """How a block wires its attention and MLP into the residual stream."""

    SEQUENTIAL = "sequential"
    """The MLP reads the residual stream after the attention write."""
    PARALLEL = "parallel"
    """Attention and MLP both read the block input; both writes are added at the end."""


@dataclass(frozen=True)
class BlockParts:
    """The modules of one transformer block, and how they are wired.

    ``post_attn_source`` is the module whose first input is the residual stream right
    after the attention write: the MLP's pre-norm in pre-norm blocks, the MLP itself
    in post-norm blocks (OLMo 2). It is ``None`` for parallel blocks, where that
    residual never exists as a tensor. ``attn_writer`` and ``mlp_writer`` are the modules
    whose outputs are the attention and MLP writes before the residual add: the
    attention module and the MLP, except in families that add the residual inside them
    (BLOOM: the attention's ``dense`` and the MLP's ``dense_4h_to_h``; MPT's ``down_proj``).
    """

    block: nn.Module
    attention: nn.Module
    o_proj: nn.Module
    mlp: nn.Module
    kind: BlockKind
    post_attn_source: nn.Module | None
    attn_writer: nn.Module
    mlp_writer: nn.Module


@dataclass(frozen=True)
class LogitTransform:
    """What the model does to the LM head's output: ``softcap(logits * multiplier)``."""

    multiplier: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass(frozen=True)
class ModelAdapter:
    """A loaded model's parts and head geometry, found once at load.

    ``num_heads`` counts query heads (the ones gates act on), the same in every layer;
    ``head_dims[layer] * num_heads`` is the width of that layer's attention output
    projection input, which may differ from ``hidden_size`` (Gemma, Qwen3) and from
    layer to layer (Gemma 4 widens the heads of its full-attention layers).
    """

    model: PreTrainedModel
    family: str
    blocks: tuple[BlockParts, ...]
    input_embeddings: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dims: tuple[int, ...]
    hidden_size: int
    vocab_size: int
    parallel_blocks: bool
    logit_transform: LogitTransform = field(default_factory=LogitTransform)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def head_dim(self) -> int | None:
        """The head width shared by every layer; ``None`` where it differs per layer."""
        widths = set(self.head_dims)
        return widths.pop() if len(widths) == 1 else None

    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        """[..., hidden] residual → [..., vocab]: final norm, LM head and logit transform.

        Applied to the last block's output this gives the model's own logits (checked
        at load), so for earlier blocks it is the logit lens.
        """
        return self.logit_transform(self.lm_head(self.final_norm(residual)))

    def describe(self) -> dict[str, Any]:
        """The model's geometry as JSON-able data (what ``GET /v1/models`` reports)."""
        return {
            "family": self.family,
            "architecture": type(self.model).__name__,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "head_dims": list(self.head_dims),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "block_kinds": sorted({b.kind.value for b in self.blocks}),
        }


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The hidden-states argument of a module call, positional or keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def first_output(output: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple."""
    return output[0] if isinstance(output, tuple | list) else output


def adapt(model: PreTrainedModel) -> ModelAdapter:
    """Locate the parts, observe each block's wiring and check the logit lens, or fail clearly."""
    cls = type(model).__name__
    config = model.config.get_text_config()
    family = str(getattr(config, "model_type", cls))
    if family == "opt":
        _opt_mlp_as_module(model)
    owner, block_list = _find_blocks(model, config, cls)
    found: list[_Parts] = []
    for i, block in enumerate(block_list):
        where = f"{cls} block {i}"
        attention = _require(_first_child(block, _ATTENTION), "attention module", where, _ATTENTION)
        o_proj = _require(
            _first_child(attention, _O_PROJ), "attention output projection", where, _O_PROJ
        )
        mlp = _require(_first_child(block, _MLP), "MLP", where, _MLP)
        found.append((block, attention, o_proj, mlp))
    final_norm = _require(_first_child(owner, _FINAL_NORM), "final norm", cls, _FINAL_NORM)
    lm_head = _require(model.get_output_embeddings(), "LM head", cls, ("get_output_embeddings()",))
    embeddings = _require(
        model.get_input_embeddings(), "input embeddings", cls, ("get_input_embeddings()",)
    )
    num_heads = _config_int(config, cls, _NUM_HEADS)
    transform = _logit_transform(config, family)

    probe = _probe(model, found)
    blocks = tuple(_wire(parts, probe, f"{cls} block {i}") for i, parts in enumerate(found))
    widths = [probe.calls[o_proj].input.shape[-1] for _, _, o_proj, _ in found]
    if any(w % num_heads for w in widths):
        raise ModelNotAdaptable(
            f"{cls}: the attention output projections' inputs ({sorted(set(widths))}) do "
            f"not all split into {num_heads} heads"
        )
    last_output = probe.calls[found[-1][0]].output
    with torch.inference_mode():
        lens = transform(lm_head(final_norm(last_output)))
    if lens.shape != probe.logits.shape or not torch.allclose(
        lens.float(),
        probe.logits.float(),
        rtol=1e-3,
        atol=1e-3 * (1 + probe.logits.abs().max().item()),
    ):
        raise ModelNotAdaptable(
            f"{cls}: final norm, LM head and logit transform {transform} do not reproduce the "
            "model's logits, so the logit lens would be wrong"
        )
    return ModelAdapter(
        model=model,
        family=family,
        blocks=blocks,
        input_embeddings=embeddings,
        final_norm=final_norm,
        lm_head=lm_head,
        num_heads=num_heads,
        num_kv_heads=_kv_heads(config, num_heads),
        head_dims=tuple(w // num_heads for w in widths),
        hidden_size=last_output.shape[-1],
        vocab_size=probe.logits.shape[-1],
        parallel_blocks=any(b.kind is BlockKind.PARALLEL for b in blocks),
        logit_transform=transform,
    )


_Parts = tuple[nn.Module, nn.Module, nn.Module, nn.Module]
"""A block's block, attention, attention output projection and MLP modules."""


@dataclass(frozen=True)
class _Call:
    """One module call seen by the probe: its tensor arguments (main one first) and output."""

    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor

    @property
    def input(self) -> torch.Tensor:
        return self.inputs[0]


@dataclass(frozen=True)
class _Probe:
    calls: dict[nn.Module, _Call]
    logits: torch.Tensor


def _probe(model: PreTrainedModel, found: list[_Parts]) -> _Probe:
    """Run a few tokens with every block, its children and its MLP's children watched."""
    watched = {m for parts in found for m in parts}
    for block, _attention, _o_proj, mlp in found:
        watched |= set(block.children()) | set(mlp.children())
    calls: dict[nn.Module, _Call] = {}
    handles = [m.register_forward_hook(_recorder(calls), with_kwargs=True) for m in watched]
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.arange(1, min(5, vocab), device=model.device)[None]
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    except Exception as exc:
        raise ModelNotAdaptable(
            f"{type(model).__name__}: a probe forward pass failed: {exc}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    for i, parts in enumerate(found):
        if not all(m in calls for m in parts):
            raise ModelNotAdaptable(
                f"{type(model).__name__} block {i}: a forward pass did not call its attention, "
                "attention output projection or MLP modules"
            )
    return _Probe(calls, logits)


def _recorder(calls: dict[nn.Module, _Call]) -> Callable[..., None]:
    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        y = first_output(out)
        main = first_tensor(args, kwargs)
        rest = [
            t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t is not main
        ]
        if isinstance(y, torch.Tensor) and main is not None:
            calls[m] = _Call((main, *rest), y)

    return hook


def _wire(parts: _Parts, probe: _Probe, where: str) -> BlockParts:
    """Read a block's wiring from the probe: where the MLP's input came from, who writes what."""
    block, attention, o_proj, mlp = parts
    calls = probe.calls
    x, attn_in, m = calls[block].input, calls[attention].input, calls[mlp].input
    children = [c for c in block.children() if c in calls]
    producer = next((c for c in children if calls[c].output is m), None)
    kind, source = BlockKind.SEQUENTIAL, producer
    if m is x or m is attn_in or (producer is not None and calls[producer].input is x):
        kind, source = BlockKind.PARALLEL, None
    elif producer is None:
        # No norm in front of the MLP: its input is the residual itself, if the block
        # either normalises the MLP's output (post-norm) or adds it to that input.
        post_norm = any(calls[c].input is calls[mlp].output for c in children)
        if not post_norm and not _same(calls[block].output, m + calls[mlp].output):
            raise ModelNotAdaptable(
                f"{where}: cannot tell where the residual stream after the attention write is "
                "(the MLP's input comes from no submodule of the block)"
            )
        source = mlp
    attn_writer = _writer(attention, [o_proj], calls, (x, attn_in))
    mlp_writer = _writer(mlp, list(mlp.children()), calls, ())
    if mlp_writer is mlp and _same(calls[mlp].output, calls[block].output):
        raise ModelNotAdaptable(
            f"{where}: the MLP's output is the block's output (it adds the residual stream "
            "itself) and none of its submodules gives its write alone"
        )
    return BlockParts(block, attention, o_proj, mlp, kind, source, attn_writer, mlp_writer)


def _writer(
    module: nn.Module,
    candidates: list[nn.Module],
    calls: dict[nn.Module, _Call],
    residuals: tuple[torch.Tensor | None, ...],
) -> nn.Module:
    """The module whose output is ``module``'s write to the residual stream.

    Normally ``module`` itself. Some families add the residual inside the attention or
    MLP module (BLOOM both, MPT the MLP: ``output = down_proj(...) + residual``); the
    write is then the candidate submodule whose output plus one of the residuals
    (``module``'s extra tensor arguments, or those given) is the module's output.
    """
    out = calls[module].output
    others = [r for r in (*calls[module].inputs[1:], *residuals) if r is not None]
    others = [r for r in others if r.shape == out.shape]
    for candidate in reversed(candidates):
        write = calls[candidate].output if candidate in calls else None
        if write is not None and any(_same(write + r, out) for r in others):
            return candidate
    return module


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding (the probe compares values computed by the same kernels)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _find_blocks(model: nn.Module, config: Any, cls: str) -> tuple[nn.Module, nn.ModuleList]:
    """The block list and the module that owns it (which also holds the final norm)."""
    for dotted in _BLOCK_LISTS:
        owner_path, _, name = dotted.rpartition(".")
        known = _get(model, owner_path)
        blocks = getattr(known, name, None)
        if known is not None and isinstance(blocks, nn.ModuleList) and len(blocks):
            return known, blocks
    layers = next((getattr(config, n) for n in _NUM_LAYERS if getattr(config, n, None)), None)
    for owner in model.modules():
        for child in owner.children():
            if (
                isinstance(child, nn.ModuleList)
                and len(child) == layers
                and all(_first_child(b, _ATTENTION) is not None for b in child)
            ):
                return owner, child
    raise ModelNotAdaptable(f"{cls}: cannot find the list of blocks (looked for {_BLOCK_LISTS})")


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    module: object = root
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def _first_child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _require(found: nn.Module | None, what: str, where: str, tried: tuple[str, ...]) -> nn.Module:
    if found is None:
        raise ModelNotAdaptable(
            f"cannot find the {what} in {where} (looked for {', '.join(tried)})"
        )
    return found


def _setting(config: Any, name: str) -> Any:
    """``config.<name>``, or ``None``. In a config whose layers differ (Gemma 4: head width
    and key/value heads per layer), transformers refuses to give a per-layer entry's
    global value; the first layer's is read instead."""
    if name in (getattr(config, "per_layer_attributes", None) or ()):
        return getattr(config.per_layer_config[0], name, None)
    return getattr(config, name, None)


def _config_int(config: Any, cls: str, names: tuple[str, ...]) -> int:
    for name in names:
        value = _setting(config, name)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelNotAdaptable(f"{cls}: config has none of {', '.join(names)}")


def _kv_heads(config: Any, num_heads: int) -> int:
    """Key/value heads (the first layer's, where they differ per layer)."""
    if _setting(config, "multi_query") and not _setting(config, "new_decoder_architecture"):
        return 1
    for name in _NUM_KV_HEADS:
        value = _setting(config, name)
        if isinstance(value, int) and value > 0:
            return value
    return num_heads


def _logit_transform(config: Any, family: str) -> LogitTransform:
    """The scalar scaling and soft-capping a family applies after its LM head (checked at load)."""
    multiplier = 1.0
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        value = getattr(config, name, None)
        if isinstance(value, int | float):
            multiplier *= float(value)
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, int | float):
        multiplier = (
            multiplier * scaling if family in _MULTIPLYING_LOGITS_SCALING else multiplier / scaling
        )
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(multiplier, float(cap) if cap else None)


class _FeedForward(nn.Module):
    """OPT's MLP as one module: ``fc2(activation(fc1(x)))``."""

    def __init__(self, fc1: nn.Module, activation: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1, self.activation, self.fc2 = fc1, activation, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.fc2(self.activation(self.fc1(x))))


def _opt_decoder_layer_forward(
    self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """transformers' ``OPTDecoderLayer.forward``, with its MLP called as ``self.mlp`` on
    [batch, seq, hidden] (OPT's own flattens the tokens first), so that the MLP's input and
    output are a module's, like every other family's."""
    training = self.training
    pre_norm = self.do_layer_norm_before
    residual = hidden_states
    if pre_norm:
        hidden_states = self.self_attn_layer_norm(hidden_states)
    hidden_states = self.self_attn(hidden_states, *args, **kwargs)[0]
    hidden_states = residual + nn.functional.dropout(hidden_states, self.dropout, training)
    if not pre_norm:
        hidden_states = self.self_attn_layer_norm(hidden_states)
    residual = hidden_states
    if pre_norm:
        hidden_states = self.final_layer_norm(hidden_states)
    hidden_states = residual + nn.functional.dropout(
        self.mlp(hidden_states), self.dropout, training
    )
    if not pre_norm:
        hidden_states = self.final_layer_norm(hidden_states)
    return hidden_states


def _opt_mlp_as_module(model: PreTrainedModel) -> None:
    """OPT keeps its MLP as ``fc1``/``fc2`` in the decoder layer, called on the tokens
    flattened to [tokens, hidden]: each layer gets an ``mlp`` module holding them and a
    forward that calls it in place. The model's logits must stay exactly what they were."""
    layers = _get(model, "model.decoder.layers")
    if not isinstance(layers, nn.ModuleList) or not all(
        isinstance(getattr(layer, "fc1", None), nn.Module) for layer in layers
    ):
        return
    ids = torch.arange(1, min(5, int(model.config.vocab_size)), device=model.device)[None]
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    originals: list[tuple[Any, nn.Module, nn.Module]] = []
    for layer in cast(list[Any], list(layers)):
        originals.append((layer, layer.fc1, layer.fc2))
        layer.mlp = _FeedForward(layer.fc1, layer.activation_fn, layer.fc2)
        del layer.fc1, layer.fc2
        layer.forward = types.MethodType(_opt_decoder_layer_forward, layer)
    try:
        with torch.inference_mode():
            after = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        same = after.shape == before.shape and torch.allclose(after, before, rtol=1e-4, atol=1e-5)
    except Exception:
        same = False
    if not same:
        for layer, fc1, fc2 in originals:
            del layer.mlp, layer.forward
            layer.fc1, layer.fc2 = fc1, fc2
        raise ModelNotAdaptable(
            f"{type(model).__name__}: its decoder layers, with their MLP as one module, no "
            "longer compute what transformers' OPT layer does (a transformers version this "
            "adapter does not know?)"
        )
