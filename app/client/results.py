"""Result objects a seed (``inteprelens``) user already knows, built from one result file.

Every result file is self-describing: its metadata names the job's kind, model
and id, and holds the parameters and summary as JSON. The classes here compute
in numpy and hand tensors out as torch tensors (when torch is installed, or when
asked) or numpy arrays, so they work without torch.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Any, ClassVar, Literal, Self, TypeVar

import numpy as np

from app.client._tensors import (
    TensorBackend,
    convert,
    log_softmax,
    read_arrays,
    read_bytes,
    read_metadata,
    resolve_backend,
)
from app.kinds import KINDS, JobKind

Source = str | os.PathLike[str] | bytes | bytearray

ROLE_CODES = {
    "irrelevant": 0,
    "facilitating": 1,
    "interfering": 2,
    "inconsistent": 3,
    "undetermined": 4,
}
"""Role of a head, as coded in a chg result's ``taxonomy`` and ``mask_roles`` tensors."""
ROLE_NAMES = {code: name for name, code in ROLE_CODES.items()}
CHG_STAGES = ("none", "positive", "negative")


class Result:
    """A job's tensors, with its ``kind``, ``model``, ``job_id``, ``params`` and ``job_summary``."""

    kind: ClassVar[str | None] = None

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        metadata: dict[str, str],
        *,
        backend: Literal["numpy", "torch"] = "numpy",
        bf16: frozenset[str] = frozenset(),
    ) -> None:
        self._arrays = arrays
        self._bf16 = bf16
        self._backend = backend
        self._converted: dict[str, Any] = {}
        self.metadata = metadata
        self.job_id: str | None = metadata.get("job_id")
        self.model: str | None = metadata.get("model")
        self.params: dict[str, Any] = json.loads(metadata.get("params") or "{}")
        self.job_summary: dict[str, Any] = json.loads(metadata.get("summary") or "{}")

    @classmethod
    def load(cls, source: Source, *, tensors: TensorBackend = "auto") -> Self:
        """Load a downloaded result file (a path or its bytes)."""
        data = read_bytes(source)
        metadata = read_metadata(data)
        kind = metadata.get("kind")
        if cls.kind is not None and kind != cls.kind:
            raise ValueError(f"{cls.__name__} needs a {cls.kind} result; this file holds {kind!r}")
        arrays, bf16 = read_arrays(data)
        return cls(arrays, metadata, backend=resolve_backend(tensors), bf16=bf16)

    @property
    def names(self) -> list[str]:
        """Names of the stored tensors, in file order."""
        return list(self._arrays)

    @property
    def tensors(self) -> dict[str, Any]:
        """Every stored tensor by name."""
        return {name: self[name] for name in self._arrays}

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    def __getitem__(self, name: str) -> Any:
        if name not in self._arrays:
            raise KeyError(
                f"no tensor {name!r} in this {self.kind or 'job'} result; has {self.names}"
            )
        if name not in self._converted:
            self._converted[name] = convert(
                self._arrays[name], self._backend, bf16=name in self._bf16
            )
        return self._converted[name]

    def _out(self, array: np.ndarray) -> Any:
        """A derived array in the caller's tensor type."""
        return convert(array, self._backend)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}{list(a.shape)}" for n, a in list(self._arrays.items())[:6])
        more = ", …" if len(self._arrays) > 6 else ""
        return (
            f"{type(self).__name__}(job_id={self.job_id!r}, model={self.model!r}, {shapes}{more})"
        )


def _records_or_frame(records: list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return records
    return pd.DataFrame.from_records(records)


class ChgResult(Result):
    """Causal Head Gating: gates per stage [num_masks, layers, heads] and the head taxonomy."""

    kind = "chg"

    @property
    def masks(self) -> dict[str, Any]:
        """Final gates by stage (``none``, ``positive`` = G+, ``negative`` = G−)."""
        return {s: self[f"masks.{s}"] for s in CHG_STAGES if f"masks.{s}" in self}

    @property
    def nll(self) -> dict[str, Any]:
        """Per-update NLL by stage."""
        return {s: self[f"nll.{s}"] for s in CHG_STAGES if f"nll.{s}" in self}

    @property
    def threshold(self) -> float:
        return float(self.params.get("threshold", 0.5))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(num_masks, layers, heads)."""
        num_masks, layers, heads = self._arrays["masks.positive"].shape
        return num_masks, layers, heads

    @cached_property
    def _g_plus(self) -> np.ndarray:
        return self._arrays["masks.positive"].astype(np.float32)

    @cached_property
    def _g_minus(self) -> np.ndarray:
        return self._arrays["masks.negative"].astype(np.float32)

    def _role_scores(self) -> dict[str, np.ndarray]:
        """Per-mask role scores [num_masks, layers, heads] (the paper's definitions)."""
        return {
            "facilitating": self._g_minus,
            "interfering": 1 - self._g_plus,
            "irrelevant": self._g_plus * (1 - self._g_minus),
        }

    @property
    def consensus(self) -> float:
        return float(self.params.get("consensus", 0.5))

    @property
    def num_masks(self) -> int:
        return self.shape[0]

    @property
    def num_layers(self) -> int:
        return self.shape[1]

    @property
    def num_heads(self) -> int:
        return self.shape[2]

    @cached_property
    def _mask_roles(self) -> np.ndarray:
        """Role codes [num_masks, layers, heads]: the server's, else by the same rules (see
        the README's CHG section) from the gates and, when stored, the gate signal."""
        if "mask_roles" in self:
            return self._arrays["mask_roles"].astype(np.int8)
        t = self.threshold
        fac = self._g_minus >= t
        inter = 1 - self._g_plus >= t
        irr = self._g_plus * (1 - self._g_minus) >= t
        roles = np.full(self._g_plus.shape, ROLE_CODES["undetermined"], dtype=np.int8)
        roles[irr] = ROLE_CODES["irrelevant"]
        roles[inter] = ROLE_CODES["interfering"]
        roles[fac] = ROLE_CODES["facilitating"]
        roles[fac & inter] = ROLE_CODES["inconsistent"]
        if "gate_signal" in self:
            weak = self._arrays["gate_signal"] < 1
            roles[weak & (roles != ROLE_CODES["irrelevant"])] = ROLE_CODES["undetermined"]
        return roles

    @cached_property
    def _consensus(self) -> tuple[np.ndarray, np.ndarray]:
        """Consensus codes and agreement [layers, heads]: the server's, else recomputed."""
        roles = self._mask_roles
        shares = np.stack([(roles == code).mean(axis=0) for code in range(len(ROLE_CODES))])
        if "taxonomy" in self:
            taxonomy = self._arrays["taxonomy"].astype(np.int8)
        else:
            best = shares[: ROLE_CODES["undetermined"]].max(axis=0)
            code = shares[: ROLE_CODES["undetermined"]].argmax(axis=0)
            taxonomy = np.where(best > self.consensus, code, ROLE_CODES["undetermined"])
        if "taxonomy_agreement" in self:
            agreement = self._arrays["taxonomy_agreement"].astype(np.float32)
        else:
            agreement = np.take_along_axis(shares, taxonomy[None].astype(np.int64), axis=0)[0]
        return taxonomy.astype(np.int8), agreement.astype(np.float32)

    @property
    def _taxonomy(self) -> np.ndarray:
        return self._consensus[0]

    @property
    def taxonomy(self) -> Any:
        """Consensus role code per head [layers, heads] int8: 0 irrelevant, 1 facilitating,
        2 interfering, 3 inconsistent, 4 undetermined."""
        return self._out(self._taxonomy)

    @property
    def taxonomy_agreement(self) -> Any:
        """Per head [layers, heads], the share of masks whose role is the consensus role."""
        return self._out(self._consensus[1])

    @property
    def mask_roles(self) -> Any:
        """Role code of every head in every mask [num_masks, layers, heads] int8."""
        return self._out(self._mask_roles)

    def _gates_above(
        self, stage: np.ndarray, threshold: float | None, mask_idx: int | None
    ) -> np.ndarray:
        gates = stage.mean(axis=0) if mask_idx is None else stage[mask_idx]
        return gates >= (self.threshold if threshold is None else threshold)

    @staticmethod
    def _listed(on: np.ndarray) -> list[tuple[int, int]]:
        layers, heads = np.nonzero(on)
        return [(int(layer), int(head)) for layer, head in zip(layers, heads, strict=True)]

    def sufficient_heads(
        self, threshold: float | None = None, mask_idx: int | None = None
    ) -> list[tuple[int, int]]:
        """(layer, head) of the sub-circuit kept under removal pressure: G− ≥ ``threshold``
        (default: the fit's), in mask ``mask_idx`` or on the mask-averaged gates as the seed
        does. The paper shows such a circuit suffices for the task. The seed returns the
        same stage, though its comments say that stage pushes gates toward 1."""
        return self._listed(self._gates_above(self._g_minus, threshold, mask_idx))

    def necessary_heads(
        self, threshold: float | None = None, mask_idx: int | None = None
    ) -> list[tuple[int, int]]:
        """(layer, head) of heads the task needs, in the paper's sense: kept under removal
        pressure (G− ≥ ``threshold``) and under keep pressure (G+ ≥ ``threshold``), i.e.
        the facilitating heads of mask ``mask_idx``, or of the mask-averaged gates as the
        seed averages them (``facilitating_heads()`` gives the consensus over masks). The
        seed returns G+ ≥ threshold alone, the keep-pressure stage, which its comments
        describe as the removal-pressure one: with its signs those are all heads that do
        not interfere, most of the model."""
        kept = self._gates_above(self._g_plus, threshold, mask_idx)
        return self._listed(kept & self._gates_above(self._g_minus, threshold, mask_idx))

    def _heads(self, role: str) -> list[tuple[int, int]]:
        layers, heads = np.nonzero(self._taxonomy == ROLE_CODES[role])
        return [(int(layer), int(head)) for layer, head in zip(layers, heads, strict=True)]

    def facilitating_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of heads the task needs (kept even under removal pressure)."""
        return self._heads("facilitating")

    def interfering_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of heads that hurt the task (removed even under keep pressure)."""
        return self._heads("interfering")

    def irrelevant_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of heads that follow the pressure either way."""
        return self._heads("irrelevant")

    def inconsistent_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of heads whose two fits contradict each other (should be rare)."""
        return self._heads("inconsistent")

    def undetermined_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of heads without a role in more than the consensus share of masks,
        or whose gate moved without a loss signal."""
        return self._heads("undetermined")

    def get_facilitating_mask(self) -> Any:
        """[layers, heads] float32 head mask: 1 on facilitating heads, 0 elsewhere."""
        return self._out((self._taxonomy == ROLE_CODES["facilitating"]).astype(np.float32))

    def head_taxonomy(self) -> Any:
        """One row per head: its consensus role and the share of masks agreeing with it,
        mean G+ and G−, and in how many masks each role's score reaches the threshold. A
        pandas DataFrame when pandas is installed, else a list of dicts."""
        g_plus, g_minus = self._g_plus.mean(axis=0), self._g_minus.mean(axis=0)
        counts = {r: (s >= self.threshold).sum(axis=0) for r, s in self._role_scores().items()}
        agreement = self._consensus[1]
        _, layers, heads = self.shape
        return _records_or_frame(
            [
                {
                    "layer": layer,
                    "head": head,
                    "role": ROLE_NAMES[int(self._taxonomy[layer, head])],
                    "agreement": float(agreement[layer, head]),
                    "g_plus": float(g_plus[layer, head]),
                    "g_minus": float(g_minus[layer, head]),
                    **{f"{r}_masks": int(c[layer, head]) for r, c in counts.items()},
                }
                for layer in range(layers)
                for head in range(heads)
            ]
        )

    def summary(self) -> dict[str, Any]:
        """Role counts over heads, the fit's shape and the final NLL of each stage."""
        num_masks, layers, heads = self.shape
        final_nll = {
            stage: float(np.asarray(self._arrays[f"nll.{stage}"]).reshape(-1)[-1])
            for stage in CHG_STAGES
            if f"nll.{stage}" in self and self._arrays[f"nll.{stage}"].size
        }
        return {
            "num_masks": num_masks,
            "layers": layers,
            "heads": heads,
            "threshold": self.threshold,
            "roles": {
                name: int((self._taxonomy == code).sum()) for name, code in ROLE_CODES.items()
            },
            "final_nll": final_nll,
        }

    def to_dataframe(self) -> Any:
        """Long format, one row per (stage, mask, layer, head) with its gate. Needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from None
        frames = []
        for stage in CHG_STAGES:
            if f"masks.{stage}" not in self:
                continue
            gates = self._arrays[f"masks.{stage}"].astype(np.float32)
            mask, layer, head = np.indices(gates.shape).reshape(3, -1)
            frames.append(
                pd.DataFrame(
                    {
                        "stage": stage,
                        "mask": mask,
                        "layer": layer,
                        "head": head,
                        "gate": gates.reshape(-1),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


class CchgResult(Result):
    """Contrastive CHG: one gate set that keeps the retain task and breaks the forget task."""

    kind = "cchg"

    @property
    def masks(self) -> Any:
        """Gates [num_masks, layers, heads]."""
        return self["masks.contrastive"]

    @property
    def gates(self) -> Any:
        """Gates averaged over masks [layers, heads]."""
        return self._out(self._arrays["masks.contrastive"].astype(np.float32).mean(axis=0))

    @property
    def nll(self) -> dict[str, Any]:
        """Per-update NLL on the retain and forget sets."""
        return {s: self[f"nll.{s}"] for s in ("retain", "forget") if f"nll.{s}" in self}


class _TextInputs(Result):
    """Results of jobs that ran on ``texts``: their token ids, mask and token strings."""

    @property
    def input_ids(self) -> Any:
        return self["input_ids"]

    @property
    def attention_mask(self) -> Any:
        return self["attention_mask"]

    @property
    def tokens(self) -> list[list[str]] | None:
        """Input tokens as strings, per text, when the server reports them."""
        return self.job_summary.get("tokens")


class TraceResult(_TextInputs):
    """Captured activations: ``<site>.<layer>`` for layer sites, ``<site>`` for model sites."""

    kind = "trace"

    _EXTRA: ClassVar[frozenset[str]] = frozenset({"final_logits", "input_ids", "attention_mask"})

    def _site_names(self) -> dict[str, list[int]]:
        """Traced sites, each with its traced layers ([] for model sites)."""
        sites: dict[str, list[int]] = {}
        for name in self.names:
            if name in self._EXTRA or name.startswith("grad."):
                continue
            site, _, layer = name.partition(".")
            sites.setdefault(site, [])
            if layer.isdigit():
                sites[site].append(int(layer))
        return sites

    @property
    def available_sites(self) -> list[str]:
        """Traced site names, sorted."""
        return sorted(self._site_names())

    def layers(self, site: str) -> list[int]:
        """Layers traced at ``site`` (empty for model sites)."""
        return sorted(self._site_names().get(site, []))

    @staticmethod
    def _name(site: str, layer: int | None) -> str:
        return site if layer is None else f"{site}.{layer}"

    def has(self, site: str, layer: int | None = None) -> bool:
        return self._name(site, layer) in self

    def get(self, site: str, layer: int | None = None) -> Any:
        """The activation at ``site`` (and ``layer`` for layer sites)."""
        name = self._name(site, layer)
        if name in self:
            return self[name]
        if site not in self._site_names():
            raise KeyError(f"site {site!r} was not traced; traced: {self.available_sites}")
        traced = self.layers(site)
        if layer is None:
            raise KeyError(f"site {site!r} is per layer: give a layer (traced: {traced})")
        raise KeyError(f"layer {layer} of {site!r} was not traced (traced: {traced or 'none'})")

    def gradient(self, site: str, layer: int | None = None) -> Any:
        """The stored gradient at a site (traces run with ``gradients``)."""
        return self[f"grad.{self._name(site, layer)}"]

    @property
    def final_logits(self) -> Any:
        return self["final_logits"]

    def final_log_probs(self) -> Any:
        """log-softmax of ``final_logits`` over the vocabulary."""
        return self._out(log_softmax(self._arrays["final_logits"]))

    def layer_log_probs(self, layer: int) -> Any:
        """Logit-lens log-probabilities of ``layer``'s residual stream."""
        return self._out(log_softmax(self._logit_lens(layer)))

    def layer_probs(self, layer: int) -> Any:
        """Logit-lens probabilities of ``layer``'s residual stream."""
        return self._out(np.exp(log_softmax(self._logit_lens(layer))))

    def _logit_lens(self, layer: int) -> np.ndarray:
        self.get("logits", layer)
        return self._arrays[f"logits.{layer}"]


class ScoreResult(_TextInputs):
    """Token scores: logits [batch, seq, vocab], already divided by the temperature."""

    kind = "score"

    @property
    def logits(self) -> Any:
        self._require_logits()
        return self["logits"]

    def _require_logits(self) -> None:
        if "logits" not in self:
            raise KeyError(
                "this score job stored no full logits (final_token_only or top_k was set); "
                f"stored: {self.names}"
            )

    @cached_property
    def _log_probs(self) -> np.ndarray:
        self._require_logits()
        return log_softmax(self._arrays["logits"])

    @cached_property
    def log_probs(self) -> Any:
        """log-softmax of the logits [batch, seq, vocab], derived on first use."""
        return self._out(self._log_probs)

    @cached_property
    def probs(self) -> Any:
        """softmax of the logits [batch, seq, vocab], derived on first use."""
        return self._out(np.exp(self._log_probs))

    def _final(self) -> np.ndarray:
        if "final_token_logits" in self:
            return self._arrays["final_token_logits"]
        self._require_logits()
        last = self._arrays["attention_mask"].sum(axis=1).astype(np.int64) - 1
        return self._arrays["logits"][np.arange(len(last)), last]

    def final_token_logits(self) -> Any:
        """Logits after each text's last real token [batch, vocab]."""
        return self._out(self._final())

    def final_token_log_probs(self) -> Any:
        return self._out(log_softmax(self._final()))

    def final_token_probs(self) -> Any:
        return self._out(np.exp(log_softmax(self._final())))

    def gather_log_probs(self, ids: Any) -> Any:
        """``log_probs[..., ids]`` elementwise: ``ids`` is [batch, seq] (or broadcastable to it),
        giving the log-probability each position assigns to the given token."""
        index = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64)
        index = np.broadcast_to(index, self._log_probs.shape[:-1])
        return self._out(np.take_along_axis(self._log_probs, index[..., None], axis=-1)[..., 0])


class AblateResult(Result):
    """NLL and accuracy with and without a fixed head mask."""

    kind = "ablate"

    @property
    def head_mask(self) -> Any:
        """The mask applied [layers, heads] (1 on, 0 off)."""
        return self["head_mask"]

    @property
    def nll(self) -> dict[str, Any]:
        """Per-example target NLL, ``baseline`` (all heads on) and ``masked``."""
        return {s: self[f"nll.{s}"] for s in ("baseline", "masked") if f"nll.{s}" in self}

    @property
    def accuracy(self) -> dict[str, Any]:
        """Per-example exact-match accuracy of the target, ``baseline`` and ``masked``."""
        return {s: self[f"accuracy.{s}"] for s in ("baseline", "masked") if f"accuracy.{s}" in self}


class AttributeResult(Result):
    """Sentence importance by gradients through a head circuit."""

    kind = "attribute"

    @property
    def scores(self) -> list[float]:
        """One importance score per sentence, in the sentences' order."""
        return list(self.job_summary.get("scores", []))

    @property
    def summary_nll(self) -> dict[str, float]:
        """The summary's mean token NLL with all heads on (``all_heads``) and through the
        circuit (``circuit``): a circuit that no longer predicts the summary makes the
        attribution one of a broken model."""
        return dict(self.job_summary.get("summary_nll", {}))


def _result_type(kind: JobKind) -> type[Result]:
    cls = globals().get(KINDS[kind].result)
    if not (isinstance(cls, type) and issubclass(cls, Result)):
        raise TypeError(
            f"app.kinds: kind {kind.value!r} names result type {KINDS[kind].result!r}, "
            "which is not a Result class of app.client.results"
        )
    return cls


RESULT_TYPES: dict[str, type[Result]] = {kind.value: _result_type(kind) for kind in KINDS}
"""Each kind's result type, as :mod:`app.kinds` names it."""


R = TypeVar("R", bound=Result)


def expect_kind(result: Result, cls: type[R]) -> R:
    if not isinstance(result, cls):
        raise TypeError(f"expected a {cls.kind} result, got {type(result).__name__}")
    return result


def load_result(source: Source, *, tensors: TensorBackend = "auto") -> Result:
    """Load a result file as the class its metadata's kind calls for."""
    data = read_bytes(source)
    cls = RESULT_TYPES.get(read_metadata(data).get("kind", ""), Result)
    return cls.load(data, tensors=tensors)
