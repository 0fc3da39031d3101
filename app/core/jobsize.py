"""How big a job is, counted the same way by the API (limits at submission) and the
workers (token limits, the exact estimate before compute, out-of-memory messages).
Torch-free.

:func:`count_tokens` counts each text's tokens and applies the token limits, with
whichever tokenizer it is given: the worker's own, or in the API the fast tokenizer a
worker published (``app.tokens``), so both count alike. :func:`result_tensors` names
every tensor a job's result will hold, with its dtype and shape, from the model's shape
and the token count of each text: results are deterministic in shape, so given the real
token counts it is exact. Where no tokenizer was published (a slow one, or no worker has
loaded the model yet), the API passes counts guessed from each text's bytes
(:func:`guess_tokens`). :func:`peak_bytes` estimates the activations a job holds at its
peak; it is a model of the computation, not a measurement, and errs low rather than high
(attention is taken to run in a fused kernel, with no [seq, seq] matrix).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.config import Limits
from app.datasets import DatasetSize, DatasetStore
from app.kinds import JobKind
from app.schemas import (
    DATASET,
    REQUEST_MODELS,
    SIZE,
    TEXT,
    AblateJob,
    AttributeJob,
    CchgJob,
    ChgJob,
    FieldRole,
    JobRequest,
    ModelInfo,
    ScoreJob,
    TraceJob,
    field_value,
    role_fields,
)
from workers.lens.sites import LAYER_SITES, SITE_NAMES, SITES


def _fields(role: FieldRole) -> dict[JobKind, tuple[str, ...]]:
    return {kind: role_fields(model, role) for kind, model in REQUEST_MODELS.items()}


TEXT_FIELDS = _fields(TEXT)
"""Each kind's text fields (marked ``TEXT`` on its request model)."""
SIZE_PARAMS = _fields(SIZE)
DATASET_FIELDS = _fields(DATASET)

ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int8": 1}
BYTES_PER_TOKEN = 4
"""The API's guess of a text's tokens: one per 4 bytes of UTF-8 (English runs 4–5
characters a token, CJK about 3 bytes), plus one for a BOS token."""
PATTERN_PROMPT_TOKENS = 24
"""Tokens of a generated aba/abb prompt (four lines of three words, then two words)."""
EVAL_CHUNK = 32
"""Examples per pass when gates are evaluated (workers.lens.gate_fit's callers)."""


def text_fields(job: JobRequest) -> dict[str, list[str]]:
    """Every text of the job given inline, by field (data sets and patterns are not
    inline); a gradient target text counts as one."""
    found: dict[str, list[str]] = {}
    for name in TEXT_FIELDS[JobKind(job.kind)]:
        value = field_value(job, name)
        if value is not None:
            found[name] = [value] if isinstance(value, str) else list(value)
    return found


def dataset_fields(job: JobRequest) -> dict[str, str]:
    """The data set ids the job names, by field."""
    fields = DATASET_FIELDS[JobKind(job.kind)]
    return {name: value for name in fields if (value := field_value(job, name)) is not None}


def describe_size(kind: str, params: dict[str, Any]) -> str:
    """``chg: 64 texts of up to 120 characters, …, num_masks=8, batch_size=32, num_masks ×
    batch_size = 256``: what a user needs to shrink a job that did not fit."""
    parts = []
    for name in TEXT_FIELDS[JobKind(kind)]:
        value = field_value(params, name)
        if value:
            texts = [value] if isinstance(value, str) else value
            longest = max(len(t) for t in texts)
            parts.append(f"{len(texts)} {name} of up to {longest} characters")
    for name in SIZE_PARAMS[JobKind(kind)]:
        if params.get(name) is not None and (name != "num_samples" or params.get("pattern")):
            parts.append(f"{name}={params[name]}")
    if params.get("num_masks") and params.get("batch_size"):
        parts.append(f"num_masks × batch_size = {params['num_masks'] * params['batch_size']}")
    return f"{kind}: " + (", ".join(parts) or "no size parameters")


def pattern_samples(job: JobRequest) -> int | None:
    """Prompts a pattern-generated chg job will make, if it is one."""
    if isinstance(job, ChgJob) and job.pattern is not None:
        return job.num_samples
    return None


@dataclass(frozen=True)
class ModelShape:
    """What sizes a job on a model: its geometry, the bytes of one activation element
    (its dtype) and the memory its device has for jobs (None: unknown). ``head_dims``:
    each layer's head width where they differ (Gemma 4), else empty; ``head_dim`` is
    then the widest."""

    layers: int
    heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    dtype_bytes: int = 4
    max_context: int | None = None
    memory_bytes: int | None = None
    head_dims: tuple[int, ...] = ()

    def head_width(self, layer: int) -> int:
        return self.head_dims[layer] if self.head_dims else self.head_dim

    @classmethod
    def of(cls, info: ModelInfo) -> ModelShape | None:
        """The shape a worker published (GET /v1/models); None before one has."""
        head_dim = info.head_dim or max(info.head_dims or [0]) or None
        sizes = (info.layers, info.heads, head_dim, info.hidden_size, info.vocab_size)
        if any(v is None for v in sizes):
            return None
        layers, heads, head_dim, hidden, vocab = (int(v or 0) for v in sizes)
        memory = None
        if info.device_memory_bytes is not None and info.model_bytes is not None:
            memory = max(info.device_memory_bytes - info.model_bytes, 0)
        return cls(
            layers=layers,
            heads=heads,
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=vocab,
            intermediate_size=info.intermediate_size or 4 * hidden,
            dtype_bytes=ITEM_BYTES.get(info.dtype or "float32", 4),
            max_context=info.max_context,
            memory_bytes=memory,
            head_dims=tuple(info.head_dims or ()) if info.head_dim is None else (),
        )


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_BYTES[self.dtype]


Tokens = Mapping[str, Sequence[int]]
"""Token count of each text, by field as :func:`text_fields` names them; data sets as
``<field>.prompt`` and ``<field>.target``."""

Encode = Callable[[list[str]], list[int]]
"""A tokenizer as :func:`count_tokens` uses it: the token count of each text, each text
tokenised on its own as the model sees it (special tokens included)."""
TOKENIZE_CHUNK_CHARS = 1 << 18
"""Texts are tokenised about this many characters at a time, so that a job far over the
token limits is refused after its first chunk, not after all of it."""


class TokenLimitExceeded(ValueError):
    """A text or a job over ``max_tokens_per_text`` or ``max_tokens_per_job``; ``field``
    names where (the worker reports it as InvalidParameter, the API as a 413)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def texts_to_count(job: JobRequest, dataset_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """Every text a job's token limits count, by field (:data:`Tokens`' names): the inline
    ones, then each data set's prompts and targets (a data set without its file, expired
    since, has none)."""
    yield from text_fields(job).items()
    for field, dataset_id in dataset_fields(job).items():
        found = DatasetStore(dataset_dir).prompts_and_targets(dataset_id)
        if found is not None:
            yield f"{field}.prompt", found[0]
            yield f"{field}.target", found[1]


def count_tokens(
    job: JobRequest,
    encode: Encode,
    limits: Limits,
    dataset_dir: Path,
    counted: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """The token count of each text of the job, by field (:data:`Tokens`), each text
    tokenised on its own by ``encode``; ``counted`` gives the counts of fields already
    tokenised (a batch's lengths), which are not tokenised again. Raises
    :class:`TokenLimitExceeded` as soon as a chunk of texts shows the job is over a
    limit."""
    total = 0
    found: dict[str, list[int]] = {}
    for field, texts in texts_to_count(job, dataset_dir):
        if not texts:
            continue
        known = (counted or {}).get(field)
        if known:
            counts = list(known)
            total = _add_counts(field, counts, total, limits)
        else:
            counts = []
            for chunk in _chunks(texts):
                counts += encode(chunk)
                total = _add_counts(field, counts[-len(chunk) :], total, limits)
        found[field] = counts
    return found


def _add_counts(field: str, counts: list[int], total: int, limits: Limits) -> int:
    longest = max(counts)
    if longest > limits.max_tokens_per_text:
        raise TokenLimitExceeded(
            field,
            f"a text of {longest} tokens exceeds the limit max_tokens_per_text = "
            f"{limits.max_tokens_per_text}",
        )
    total += sum(counts)
    if total > limits.max_tokens_per_job:
        raise TokenLimitExceeded(
            "texts",
            f"{total} tokens in all exceed the limit max_tokens_per_job = "
            f"{limits.max_tokens_per_job}",
        )
    return total


def _chunks(texts: list[str]) -> Iterable[list[str]]:
    """Runs of texts of about ``TOKENIZE_CHUNK_CHARS`` characters (one text at least)."""
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= TOKENIZE_CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def guess_tokens(text: str, cap: int | None = None) -> int:
    """The API's guess of a text's token count (see ``BYTES_PER_TOKEN``), at most ``cap``."""
    return _guess_bytes(len(text.encode()), cap)


def guessed_tokens(
    job: JobRequest, cap: int | None, datasets: Mapping[str, DatasetSize] | None = None
) -> dict[str, list[int]]:
    """:data:`Tokens` guessed from the texts' bytes, each at most ``cap``; each row of a
    data set is taken to be as long as its longest prompt and target."""
    tokens = {f: [guess_tokens(t, cap) for t in texts] for f, texts in text_fields(job).items()}
    for field, size in (datasets or {}).items():
        prompt = _guess_bytes(size.prompt_bytes, cap)
        tokens[f"{field}.prompt"] = [prompt] * size.rows
        tokens[f"{field}.target"] = [_guess_bytes(size.target_bytes, cap)] * size.rows
    return tokens


def _guess_bytes(size: int, cap: int | None) -> int:
    guess = -(-size // BYTES_PER_TOKEN) + 1
    return guess if cap is None else min(guess, cap)


def result_tensors(job: JobRequest, shape: ModelShape, tokens: Tokens) -> dict[str, TensorSpec]:
    """Every tensor of the job's result, by name (see each kind's analysis for why)."""
    if isinstance(job, ScoreJob):
        return _score_tensors(job, shape, tokens)
    if isinstance(job, TraceJob):
        return _trace_tensors(job, shape, tokens)
    if isinstance(job, ChgJob):
        return _chg_tensors(job, shape)
    if isinstance(job, CchgJob):
        heads = (job.num_masks, shape.layers, shape.heads)
        return {
            "masks.contrastive": TensorSpec("float32", heads),
            "nll.retain": TensorSpec("float32", (job.num_updates,)),
            "nll.forget": TensorSpec("float32", (job.num_updates,)),
        }
    if isinstance(job, AblateJob):
        n = len(_examples(job, tokens))
        per = {f"{m}.{c}": TensorSpec("float32", (n,)) for m in ("nll", "accuracy") for c in _AB}
        return per | {"head_mask": TensorSpec("float32", (shape.layers, shape.heads))}
    if not isinstance(job, AttributeJob):
        raise UnsizedKind(job.kind)
    document = sum(tokens.get("document", [0]))
    seq = document + sum(tokens.get("summary", [0]))
    return {
        "token_grad_norms": TensorSpec("float32", (document,)),
        "token_sentence": TensorSpec("int64", (document,)),
        "sentence_scores": TensorSpec("float32", (len(job.sentences),)),
        "input_ids": TensorSpec("int64", (seq,)),
    }


_AB = ("baseline", "masked")


class UnsizedKind(NotImplementedError):
    """A kind this module cannot size yet: each kind's result tensors and peak memory
    are written here, beside its advice (``tests/app/test_kind_registry.py`` checks)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"app.core.jobsize does not size {kind} jobs")


def result_bytes(job: JobRequest, shape: ModelShape, tokens: Tokens) -> int:
    return sum(t.nbytes for t in result_tensors(job, shape, tokens).values())


def _batch(tokens: Tokens, field: str = "texts") -> tuple[int, int]:
    """Rows and padded length of a field's texts in one right-padded batch."""
    counts = tokens.get(field) or [1]
    return len(counts), max(counts)


def _score_tensors(job: ScoreJob, shape: ModelShape, tokens: Tokens) -> dict[str, TensorSpec]:
    b, s = _batch(tokens)
    v = shape.vocab_size
    out: dict[str, TensorSpec] = {}
    if not job.final_token_only:
        if job.top_k is None:
            out["logits"] = TensorSpec("float32", (b, s, v))
        else:
            out["top_k_logits"] = TensorSpec("float32", (b, s, job.top_k))
            out["top_k_ids"] = TensorSpec("int64", (b, s, job.top_k))
    return out | {
        "final_token_logits": TensorSpec("float32", (b, v)),
        "input_ids": TensorSpec("int64", (b, s)),
        "attention_mask": TensorSpec("int64", (b, s)),
    }


def _trace_layers(job: TraceJob, shape: ModelShape) -> list[int]:
    return sorted(set(job.layers)) if job.layers is not None else list(range(shape.layers))


def _trace_sites(job: TraceJob) -> list[str]:
    return [s for s in SITE_NAMES if job.sites is None or s in job.sites]


def _kept(job: TraceJob, seq: int) -> int:
    if job.positions == "all":
        return seq
    return 1 if job.positions == "last" else len(job.positions)


def _site_width(site: str, shape: ModelShape, layer: int | None) -> int:
    if site == "logits":
        return shape.vocab_size
    if site == "attn_o_proj_pre" and layer is not None:
        return shape.heads * shape.head_width(layer)
    return shape.hidden_size


def _site_names(
    job: TraceJob, shape: ModelShape, sites: list[str]
) -> list[tuple[str, int | None, str]]:
    """(site, layer or None, tensor name) of each captured tensor."""
    layers = _trace_layers(job, shape)
    return [
        (site, layer, SITES[site].tensor_name(layer))
        for site in sites
        for layer in (layers if site in LAYER_SITES else [None])
    ]


def _trace_tensors(job: TraceJob, shape: ModelShape, tokens: Tokens) -> dict[str, TensorSpec]:
    b, s = _batch(tokens)
    k = _kept(job, s)
    dtype = job.dtype.value
    sites = _trace_sites(job)
    out = {
        name: TensorSpec(dtype, (b, k, _site_width(site, shape, layer)))
        for site, layer, name in _site_names(job, shape, sites)
    }
    out["final_logits"] = TensorSpec("float32", (b, k, shape.vocab_size))
    out["input_ids"] = TensorSpec("int64", (b, s))
    out["attention_mask"] = TensorSpec("int64", (b, s))
    if job.positions != "all":
        out["positions"] = TensorSpec("int64", (b, k))
    if job.gradients is not None:
        on_path = [site for site in sites if site != "logits"]
        for site, layer, name in _site_names(job, shape, on_path):
            out[f"grad.{name}"] = TensorSpec(dtype, (b, k, _site_width(site, shape, layer)))
    return out


def _chg_tensors(job: ChgJob, shape: ModelShape) -> dict[str, TensorSpec]:
    heads = (job.num_masks, shape.layers, shape.heads)
    stages = {"none": job.num_updates, "positive": job.num_reg_updates}
    stages["negative"] = job.num_reg_updates
    out = {f"masks.{stage}": TensorSpec("float32", heads) for stage in stages}
    out |= {f"nll.{stage}": TensorSpec("float32", (n,)) for stage, n in stages.items()}
    for score in ("facilitation", "interference", "irrelevance"):
        out[f"scores.{score}"] = TensorSpec("float32", heads)
    out["taxonomy"] = TensorSpec("int8", (shape.layers, shape.heads))
    out["taxonomy_agreement"] = TensorSpec("float32", (shape.layers, shape.heads))
    out["mask_roles"] = TensorSpec("int8", heads)
    out["gate_signal"] = TensorSpec("float32", heads)
    if job.record_history:
        for stage, n in stages.items():
            out[f"history.{stage}"] = TensorSpec("float32", (n, *heads))
    return out


def _examples(job: ChgJob | AblateJob, tokens: Tokens) -> list[tuple[int, int]]:
    """(prompt, target) token counts of each example of a prompt/target job."""
    if isinstance(job, ChgJob) and job.pattern is not None:
        return [(PATTERN_PROMPT_TOKENS, 1)] * job.num_samples
    field = "dataset" if job.dataset is not None else None
    prompts = tokens.get(f"{field}.prompt" if field else "texts") or [1]
    targets = tokens.get(f"{field}.target" if field else "targets") or [1] * len(prompts)
    return list(zip(prompts, targets, strict=False))


def _pairs(tokens: Tokens, side: str) -> list[tuple[int, int]]:
    for prompts, targets in (
        (f"{side}_texts", f"{side}_targets"),
        (f"{side}_dataset.prompt", f"{side}_dataset.target"),
    ):
        if tokens.get(prompts):
            return list(zip(tokens[prompts], tokens.get(targets) or [], strict=False))
    return [(1, 1)]


def _block_bytes(shape: ModelShape, rows: int, seq: int) -> int:
    """What one block holds while it runs, in inference: the residual stream, the
    attention's queries, keys, values and output, and the MLP's intermediate activations."""
    per_token = 4 * shape.hidden_size + 3 * shape.intermediate_size
    return rows * seq * per_token * shape.dtype_bytes


def _graph_bytes(shape: ModelShape, rows: int, seq: int) -> int:
    """What autograd keeps of a whole pass for a backward one. The weights are frozen, so
    a projection keeps nothing (its input's gradient needs only its weight); per block
    and token: the inputs of the two norms, queries, keys, values and the attention's
    output (about four hidden widths), the gated heads' input, and the MLP's activation
    input and the two operands of its product (three MLP widths)."""
    per_token = 7 * shape.hidden_size + 3 * shape.intermediate_size
    return shape.layers * rows * seq * per_token * shape.dtype_bytes


CHECKPOINTED_BLOCK_GRAPHS = 3
"""Blocks' graphs a checkpointed backward pass holds beside the blocks' inputs: the block
it recomputes, its gradients and the passes' transients. A chg update of 2 × 1024 tokens
on the SmolLM2-135M shape peaked at 0.24 GiB of live memory above the model on the CPU:
the inputs and about one and a half blocks' graphs (``bench/chg_memory.py``; glibc's heap
may keep more resident after frees, which no estimate of live tensors covers)."""


def _checkpointed_graph_bytes(shape: ModelShape, rows: int, seq: int) -> int:
    """:func:`_graph_bytes` with gradient checkpointing per block: each block keeps only
    its input (one hidden width per token) until the backward pass, which rebuilds one
    block's graph at a time (see :data:`CHECKPOINTED_BLOCK_GRAPHS`)."""
    inputs = shape.layers * rows * seq * shape.hidden_size * shape.dtype_bytes
    block = _graph_bytes(shape, rows, seq) // shape.layers
    return inputs + CHECKPOINTED_BLOCK_GRAPHS * block


def _fit_graph_bytes(
    job: ChgJob | CchgJob, shape: ModelShape, rows: int, lengths: list[int]
) -> int:
    """What autograd keeps of a fit's pass over a batch of examples of these ``lengths``
    (prompt + target tokens): batches of ``checkpoint_above`` tokens or more are
    checkpointed, shorter ones are not, so the longest of each kind may hold the most
    (with a token's margin, as counts made apart may differ by one from a joined text)."""
    short = [n for n in lengths if n <= job.checkpoint_above]
    long = [n for n in lengths if n >= job.checkpoint_above - 1]
    plain = _graph_bytes(shape, rows, max(short)) if short else 0
    return max(plain, _checkpointed_graph_bytes(shape, rows, max(long)) if long else 0)


def _fit_rows(job: ChgJob | CchgJob, n: int) -> int:
    return min(job.batch_size, max(n, 1))


def peak_bytes(job: JobRequest, shape: ModelShape, tokens: Tokens) -> int:
    """Estimated peak bytes of activations and results while the job runs (its model's
    weights not included)."""
    v, d = shape.vocab_size, shape.dtype_bytes
    result = result_bytes(job, shape, tokens)
    if isinstance(job, ScoreJob):
        b, s = _batch(tokens)
        return result + b * s * v * d + _block_bytes(shape, b, s)
    if isinstance(job, TraceJob):
        b, s = _batch(tokens)
        captured = result * d // ITEM_BYTES[job.dtype.value]
        peak = captured + result + b * s * v * d + _block_bytes(shape, b, s)
        if job.gradients is not None:
            m = max(tokens.get("gradients.target") or [len(job.gradients.target_ids or [1])])
            peak += _graph_bytes(shape, b, s + m) + b * (s + m) * v * (d + 4)
        return peak
    if isinstance(job, ChgJob):
        examples = _examples(job, tokens)
        lengths = [p + t for p, t in examples]
        picks = max(t for _, t in examples)
        sets = job.num_masks * (2 if job.num_reg_updates else 1)
        rows = sets * _fit_rows(job, len(examples))
        return result + _fit_graph_bytes(job, shape, rows, lengths) + 3 * rows * picks * v * 4
    if isinstance(job, CchgJob):
        sides = [_pairs(tokens, "retain"), _pairs(tokens, "forget")]
        lengths = [p + t for side in sides for p, t in side]
        picks = max(t for side in sides for _, t in side)
        rows = job.num_masks * _fit_rows(job, len(sides[0]))
        graph = _fit_graph_bytes(job, shape, rows, lengths)
        return result + 2 * (graph + 3 * rows * picks * v * 4)
    if isinstance(job, AblateJob):
        examples = _examples(job, tokens)
        seq = max(p + t for p, t in examples)
        rows = 2 * min(EVAL_CHUNK, len(examples))
        picks = max(t for _, t in examples)
        return result + _block_bytes(shape, rows, seq) + rows * picks * v * 4
    if not isinstance(job, AttributeJob):
        raise UnsizedKind(job.kind)
    seq = sum(tokens.get("document", [1])) + sum(tokens.get("summary", [1]))
    return result + _graph_bytes(shape, 1, seq) + seq * v * (d + 4)


def fit_rows(job: JobRequest, prompts: int) -> int | None:
    """Prompt rows a gate fit draws in all (``plan_batches``: updates × accumulation ×
    rows per batch), given its number of prompts; None for other kinds."""
    if isinstance(job, ChgJob):
        updates = (job.num_updates + job.num_reg_updates) * job.gradient_accum_steps
        return updates * _fit_rows(job, prompts)
    if isinstance(job, CchgJob):
        return job.num_updates * _fit_rows(job, prompts)
    return None


RESULT_ADVICE = {
    "score": "send fewer or shorter texts, or ask for final_token_only or top_k",
    "trace": "ask for fewer layers, sites, texts or positions (positions='last'), "
    "dtype='float16', or leave out the logits site",
    "chg": "lower num_masks, num_updates or num_reg_updates, or turn record_history off",
    "cchg": "lower num_masks or num_updates",
    "ablate": "send fewer examples",
    "attribute": "send a shorter document",
}
MEMORY_ADVICE = {
    "score": "send fewer or shorter texts (the logits alone are texts × tokens × vocabulary)",
    "trace": "send fewer or shorter texts, or trace fewer layers and sites",
    "chg": "lower num_masks or batch_size, or send shorter texts (max_length)",
    "cchg": "lower num_masks or batch_size, or send shorter texts (max_length)",
    "ablate": "send shorter texts (max_length)",
    "attribute": "send a shorter document",
}

"""What to lower when a kind's result or peak memory is over its limit, by kind."""


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


class JobTooLarge(ValueError):
    """A job whose estimated result or peak memory exceeds a limit; the message names the
    estimate, the limit and what to lower."""


@dataclass(frozen=True)
class Estimate:
    """A job's cost as estimated before it runs: its result's tensor bytes (exact, given
    true token counts) and its peak activation bytes (a model of the computation)."""

    result_bytes: int
    peak_bytes: int


def estimate(job: JobRequest, shape: ModelShape, tokens: Tokens) -> Estimate:
    return Estimate(result_bytes(job, shape, tokens), peak_bytes(job, shape, tokens))


def check_cost(
    job: JobRequest,
    shape: ModelShape,
    tokens: Tokens,
    limits: Limits,
    *,
    guessed: bool,
) -> Estimate:
    """The job's :class:`Estimate` from ``tokens``; refuses a job whose result is over
    ``max_result_bytes`` or whose peak memory is over :func:`memory_limit`."""
    how = "tokens guessed from the texts' bytes" if guessed else "its texts' token counts"
    max_result_bytes = limits.max_result_bytes
    max_memory_bytes = memory_limit(shape, limits.max_job_memory_bytes)
    cost = estimate(job, shape, tokens)
    size = cost.result_bytes
    if size > max_result_bytes:
        raise JobTooLarge(
            f"the result would hold {size} bytes ({_gib(size)}) of tensors, estimated from "
            f"the model's shape and {how}, over the limit max_result_bytes = "
            f"{max_result_bytes}: {RESULT_ADVICE[job.kind]}"
        )
    if max_memory_bytes is not None and cost.peak_bytes > max_memory_bytes:
        raise JobTooLarge(
            f"the job would need about {_gib(cost.peak_bytes)} of memory at its peak, "
            f"estimated from the model's shape and {how}, over the {_gib(max_memory_bytes)} "
            f"a job may use on this model (max_job_memory_bytes, or its device's memory "
            f"less the model): {MEMORY_ADVICE[job.kind]}"
        )
    return cost


def memory_limit(shape: ModelShape, operator: int | None) -> int | None:
    """The memory a job may use: the operator's limit and the device's free memory."""
    found = [m for m in (shape.memory_bytes, operator) if m is not None]
    return min(found) if found else None
