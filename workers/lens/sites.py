"""The vocabulary of traceable sites: a public API, shared by tracing and the HTTP schema.

It imports nothing but the standard library: it is the one module of the analysis core
that the web side (``app``) imports, so the API validates site names without torch. The
import-linter contracts in pyproject.toml hold both sides to that (docs/layering.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    LAYER = "layer"
    MODEL = "model"


@dataclass(frozen=True)
class Site:
    name: str
    scope: Scope
    shape: str
    description: str

    def tensor_name(self, layer: int | None = None) -> str:
        """Name of the result tensor for this site (``<site>.<layer>`` or ``<site>``)."""
        if self.scope is Scope.LAYER:
            if layer is None:
                raise ValueError(f"site {self.name!r} is per layer and needs a layer index")
            return f"{self.name}.{layer}"
        return self.name


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site(
            "block_input", Scope.LAYER, "[batch, seq, hidden]", "residual stream entering the block"
        ),
        Site(
            "attn_o_proj_pre",
            Scope.LAYER,
            "[batch, seq, heads * head_dim]",
            "input of the attention output projection (heads concatenated, before W_O)",
        ),
        Site(
            "attn_output",
            Scope.LAYER,
            "[batch, seq, hidden]",
            "attention module output, before the residual add",
        ),
        Site(
            "post_attn_residual",
            Scope.LAYER,
            "[batch, seq, hidden]",
            "residual stream right after the attention write (parallel blocks: block input "
            "plus attention output)",
        ),
        Site(
            "mlp_input",
            Scope.LAYER,
            "[batch, seq, hidden]",
            "input of the MLP (after its norm, if any; parallel blocks: the normed block input)",
        ),
        Site(
            "mlp_output", Scope.LAYER, "[batch, seq, hidden]", "MLP output, before the residual add"
        ),
        Site(
            "block_output", Scope.LAYER, "[batch, seq, hidden]", "residual stream leaving the block"
        ),
        Site("final_norm", Scope.MODEL, "[batch, seq, hidden]", "output of the final norm"),
        Site("lm_head_input", Scope.MODEL, "[batch, seq, hidden]", "input of the LM head"),
        Site(
            "logits",
            Scope.LAYER,
            "[batch, seq, vocab]",
            "that layer's residual stream through the final norm and LM head (logit lens)",
        ),
    )
}

SITE_NAMES: tuple[str, ...] = tuple(SITES)
LAYER_SITES: tuple[str, ...] = tuple(n for n, s in SITES.items() if s.scope is Scope.LAYER)
MODEL_SITES: tuple[str, ...] = tuple(n for n, s in SITES.items() if s.scope is Scope.MODEL)
