"""The public contract in pydantic: job requests per kind, job documents, models.

Shared by the API (validation, OpenAPI) and the workers (typed parameters), so
it must stay torch-free.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum, StrEnum
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.kinds import KINDS, JobKind
from workers.lens.sites import SITE_NAMES


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class FieldRole(Enum):
    """What a request field holds, as ``Annotated`` metadata on it: the size limits, token
    counts and out-of-memory messages find a kind's fields by these, not by a list."""

    TEXT = "text"
    """Text the job tokenises: bounded by max_texts, max_text_chars and the token limits."""
    DATASET = "dataset"
    """The id of an uploaded data set, whose rows the job reads."""
    SIZE = "size"
    """A count that sizes the job, named when it does not fit."""


TEXT, DATASET, SIZE = FieldRole.TEXT, FieldRole.DATASET, FieldRole.SIZE


class KeepRule(StrEnum):
    """Which heads an ablation keeps on, given a chg job's taxonomy."""

    FACILITATING = "facilitating"
    SUFFICIENT = "sufficient"
    NON_INTERFERING = "non_interfering"
    REMOVE_FACILITATING = "remove_facilitating"


class TensorDtype(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


Texts = Annotated[
    str | list[str],
    Field(description="One text or a list of texts; batches are right-padded."),
    TEXT,
]
TextList = Annotated[list[str] | None, TEXT]
DatasetId = Annotated[str | None, DATASET]
HeadMask = Annotated[
    list[list[float]],
    Field(description="Gate per head, [layers][heads], each in [0, 1]."),
]


TargetJoin = Annotated[
    Literal["space", "raw"],
    Field(
        description=(
            "How a target is joined to its prompt. 'space' (the seed's and the CHG authors' "
            "convention): the prompt's trailing whitespace is stripped, the target gets one "
            "leading space unless it starts with whitespace, and a token boundary is forced "
            "between them. 'raw': the target is the literal continuation of the prompt's "
            "characters."
        )
    ),
]
Consensus = Annotated[
    float,
    Field(
        ge=0.5,
        lt=1,
        description=(
            "A head's consensus role is the one it takes in more than this share of the "
            "masks; else it is undetermined."
        ),
    ),
]


def as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


class _JobBase(BaseModel):
    # NaN and ±Infinity: Python's JSON parser takes them in a body, and an infinite
    # learning rate or temperature passes a "> 0" bound
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: str
    model: str = Field(description="Name of a served model (see GET /v1/models).")

    def text_list(self) -> list[str]:
        """The job's texts as a list (one text is a batch of one)."""
        return as_list(getattr(self, "texts"))  # noqa: B009 - only kinds with texts call this


def _non_empty_texts(value: str | list[str]) -> str | list[str]:
    texts = as_list(value)
    if not texts:
        raise ValueError("must hold at least one text")
    if any(not t for t in texts):
        raise ValueError("texts must not be empty strings")
    return value


class ScoreJob(_JobBase):
    kind: Literal["score"] = "score"
    texts: Texts
    temperature: float = Field(1.0, gt=0, description="Logits are divided by this (> 0).")
    final_token_only: bool = Field(
        False, description="Return only the last real token's logits (no [batch, seq, vocab])."
    )
    top_k: int | None = Field(
        None, ge=1, description="Return only the top-k logits per position, with their token ids."
    )

    _texts = field_validator("texts")(_non_empty_texts)


class GradientTarget(BaseModel):
    """What a trace differentiates: the log-probability of a continuation."""

    model_config = ConfigDict(extra="forbid")

    target: Annotated[str | None, TEXT] = Field(
        None, description="Continuation text whose log-probability is differentiated."
    )
    target_ids: list[int] | None = Field(None, description="Or the continuation's token ids.")
    position: int = Field(
        -1, description="Position whose prediction starts the target; -1 is each text's last token."
    )

    @model_validator(mode="after")
    def _one_target(self) -> GradientTarget:
        if (self.target is None) == (self.target_ids is None):
            raise ValueError("give exactly one of target and target_ids")
        if self.target is not None and not self.target:
            raise ValueError("target must not be empty")
        if self.target_ids is not None and not self.target_ids:
            raise ValueError("target_ids must not be empty")
        return self


class TraceJob(_JobBase):
    kind: Literal["trace"] = "trace"
    texts: Texts
    layers: list[int] | None = Field(None, description="Layer indices to trace (default all).")
    sites: list[str] | None = Field(
        None, description=f"Sites to capture (default all): {', '.join(SITE_NAMES)}."
    )
    positions: Literal["all", "last"] | list[int] = Field(
        "all", description="'all', 'last' (each text's last real token) or a list of positions."
    )
    dtype: TensorDtype = Field(TensorDtype.FLOAT32, description="Dtype of the stored activations.")
    gradients: GradientTarget | None = Field(
        None, description="Also store grad.<site>.<layer>: gradients of a target's log-probability."
    )

    _texts = field_validator("texts")(_non_empty_texts)

    @field_validator("sites")
    @classmethod
    def _known_sites(cls, sites: list[str] | None) -> list[str] | None:
        if sites is None:
            return None
        unknown = [s for s in sites if s not in SITE_NAMES]
        if unknown:
            raise ValueError(f"unknown sites {unknown}; known: {list(SITE_NAMES)}")
        if not sites:
            raise ValueError("must name at least one site")
        return sites

    @field_validator("layers")
    @classmethod
    def _layers_non_empty(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and not layers:
            raise ValueError("must name at least one layer")
        return layers

    @field_validator("positions")
    @classmethod
    def _positions_non_empty(cls, positions: str | list[int]) -> str | list[int]:
        if isinstance(positions, list) and not positions:
            raise ValueError("must name at least one position (or be 'all' or 'last')")
        return positions


class _PromptTargets(_JobBase):
    """Prompt/target data given inline, as a generated pattern, or as an uploaded data set."""

    texts: TextList = Field(None, description="Prompts.")
    targets: TextList = Field(
        None, description="Targets, one per prompt, joined to it as target_join says."
    )
    dataset: DatasetId = Field(None, description="Id of an uploaded data set (POST /v1/datasets).")
    max_length: int | None = Field(
        None, ge=2, description="Truncate prompt + target to this many tokens."
    )
    target_join: TargetJoin = "space"

    @model_validator(mode="after")
    def _check_data(self) -> _PromptTargets:
        pattern = getattr(self, "pattern", None)
        given = [
            x for x in (self.texts is not None, self.dataset is not None, pattern is not None) if x
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of texts+targets, dataset or pattern")
        if self.texts is not None:
            if self.targets is None:
                raise ValueError("targets: required with texts")
            if len(self.texts) != len(self.targets):
                raise ValueError(
                    f"targets: {len(self.targets)} targets for {len(self.texts)} texts; "
                    "they must match one to one"
                )
            if not self.texts:
                raise ValueError("texts: must hold at least one prompt")
            if any(not t for t in self.targets):
                raise ValueError("targets: must not contain empty strings")
        elif self.targets is not None:
            raise ValueError("targets: only allowed with texts")
        return self


class ChgJob(_PromptTargets):
    kind: Literal["chg"] = "chg"
    pattern: Literal["mixed", "aba", "abb"] | None = Field(
        None,
        description=(
            "Generate the aba/abb task as the CHG authors' rows; 'mixed' (the paper's set) "
            "mixes both rules."
        ),
    )
    num_samples: Annotated[int, SIZE] = Field(
        64, ge=1, description="Samples generated for a pattern."
    )
    num_masks: Annotated[int, SIZE] = Field(
        10, ge=1, description="Independent gate sets fitted at once."
    )
    num_updates: Annotated[int, SIZE] = Field(
        500, ge=1, description="Updates of the λ = 0 fit (stage none)."
    )
    num_reg_updates: Annotated[int, SIZE] = Field(
        500, ge=0, description="Updates of each regularised fit."
    )
    batch_size: Annotated[int, SIZE] = Field(32, ge=1, description="Prompts per update.")
    l1_weight: float = Field(0.1, ge=0, description="λ magnitude of the regularised fits.")
    lr: float = Field(1.0, gt=0, description="Adam learning rate.")
    lr_end: float | None = Field(None, gt=0, description="Decay the rate linearly to this.")
    gradient_accum_steps: int = Field(1, ge=1, description="Batches accumulated per update.")
    seed: int | None = Field(None, description="Makes a fit reproducible.")
    threshold: float = Field(0.5, ge=0, le=1, description="Score needed to take a role.")
    consensus: Consensus = 0.5
    record_history: bool = Field(False, description="Store the gates after every update.")
    checkpoint_above: int = Field(
        512,
        ge=1,
        description=(
            "Gradient checkpointing for batches of examples this many tokens long or more "
            "(padded), as attribute jobs do past 512 tokens: each block keeps only its input "
            "and recomputes the rest in the backward pass. The same fit in less memory, for "
            "one more forward pass of each block."
        ),
    )


class AblateJob(_PromptTargets):
    kind: Literal["ablate"] = "ablate"
    head_mask: HeadMask | None = None
    from_job: str | None = Field(
        None, description="Id of a succeeded chg job of yours on this model."
    )
    keep: KeepRule | None = Field(None, description="With from_job: which heads stay on.")
    threshold: float = Field(0.5, ge=0, le=1, description="Gate threshold for from_job roles.")
    consensus: Consensus = 0.5

    @model_validator(mode="after")
    def _one_mask(self) -> AblateJob:
        _check_mask_source(self.head_mask, self.from_job, self.keep, "head_mask")
        return self


def _check_mask_source(
    mask: list[list[float]] | None, from_job: str | None, keep: KeepRule | None, mask_field: str
) -> None:
    if (mask is None) == (from_job is None):
        raise ValueError(f"give exactly one of {mask_field} and from_job")
    if from_job is not None and keep is None:
        raise ValueError("keep: required with from_job")
    if mask is not None:
        if keep is not None:
            raise ValueError(f"keep: only allowed with from_job, not with {mask_field}")
        if not mask or any(not row for row in mask):
            raise ValueError(f"{mask_field}: must be a non-empty [layers][heads] matrix")
        if len({len(row) for row in mask}) != 1:
            raise ValueError(f"{mask_field}: rows must all have the same number of heads")
        if any(not 0.0 <= v <= 1.0 for row in mask for v in row):
            raise ValueError(f"{mask_field}: values must lie in [0, 1]")


class CchgJob(_JobBase):
    kind: Literal["cchg"] = "cchg"
    retain_texts: TextList = None
    retain_targets: TextList = None
    forget_texts: TextList = None
    forget_targets: TextList = None
    retain_dataset: DatasetId = None
    forget_dataset: DatasetId = None
    eval_retain_texts: TextList = None
    eval_retain_targets: TextList = None
    eval_forget_texts: TextList = None
    eval_forget_targets: TextList = None
    max_length: int | None = Field(None, ge=2)
    target_join: TargetJoin = "space"
    num_masks: Annotated[int, SIZE] = Field(1, ge=1)
    num_updates: Annotated[int, SIZE] = Field(500, ge=1)
    batch_size: Annotated[int, SIZE] = Field(64, ge=1)
    lr: float = Field(0.1, gt=0)
    lr_end: float = Field(0.01, gt=0)
    l1_weight: float = Field(0.1, ge=0)
    diff_clip: float = Field(5.0, gt=0, description="Clamp of forget − retain log-prob from below.")
    seed: int | None = None
    checkpoint_above: int = Field(
        512, ge=1, description="Gradient checkpointing from this many tokens, as chg's."
    )

    @model_validator(mode="after")
    def _check_pairs(self) -> CchgJob:
        inline = (self.retain_texts, self.retain_targets, self.forget_texts, self.forget_targets)
        datasets = (self.retain_dataset, self.forget_dataset)
        if any(x is not None for x in datasets):
            if any(x is None for x in datasets):
                raise ValueError("retain_dataset and forget_dataset go together")
            if any(x is not None for x in inline):
                raise ValueError("give inline pairs or data sets, not both")
        else:
            _check_quad("", *inline, required=True)
        _check_quad(
            "eval_",
            self.eval_retain_texts,
            self.eval_retain_targets,
            self.eval_forget_texts,
            self.eval_forget_targets,
            required=False,
        )
        return self


def _check_quad(
    prefix: str,
    retain_texts: list[str] | None,
    retain_targets: list[str] | None,
    forget_texts: list[str] | None,
    forget_targets: list[str] | None,
    *,
    required: bool,
) -> None:
    names = ("retain_texts", "retain_targets", "forget_texts", "forget_targets")
    values = (retain_texts, retain_targets, forget_texts, forget_targets)
    if not required and all(v is None for v in values):
        return
    for name, v in zip(names, values, strict=True):
        if v is None:
            raise ValueError(f"{prefix}{name}: required")
        if not v:
            raise ValueError(f"{prefix}{name}: must not be empty")
        if name.endswith("targets") and any(not t for t in v):
            raise ValueError(f"{prefix}{name}: must not contain empty strings")
    n = len(values[0])  # type: ignore[arg-type]
    for name, v in zip(names[1:], values[1:], strict=True):
        if len(v) != n:  # type: ignore[arg-type]
            raise ValueError(
                f"{prefix}{name}: has {len(v)} items but {prefix}retain_texts has {n}; "  # type: ignore[arg-type]
                "pairs are matched by position"
            )


class AttributeJob(_JobBase):
    kind: Literal["attribute"] = "attribute"
    document: Annotated[str, TEXT] = Field(min_length=1, description="The source document.")
    sentences: Annotated[list[str], TEXT] = Field(
        min_length=1, description="Sentences of the document, in order."
    )
    summary: Annotated[str, TEXT] = Field(
        min_length=1, description="Target text whose log-likelihood is differentiated."
    )
    facilitating_mask: HeadMask | None = None
    from_job: str | None = None
    keep: KeepRule | None = None
    threshold: float = Field(0.5, ge=0, le=1)
    consensus: Consensus = 0.5
    aggregate: Literal["mean", "sum", "max"] = "mean"
    target_join: TargetJoin = Field(
        "space",
        description="How the summary is joined to the document (as a target to its prompt).",
    )
    normalize: Literal["max", "none"] = Field(
        "max", description="'max' divides the sentence scores by the largest (the seed's)."
    )
    loss: Literal["mean", "sum"] = Field(
        "mean",
        description="The summary's NLL averaged over its tokens (the seed's) or summed.",
    )

    @field_validator("sentences")
    @classmethod
    def _non_empty_sentences(cls, sentences: list[str]) -> list[str]:
        if any(not s.strip() for s in sentences):
            raise ValueError("sentences must not be empty")
        return sentences

    @model_validator(mode="after")
    def _one_mask(self) -> AttributeJob:
        _check_mask_source(self.facilitating_mask, self.from_job, self.keep, "facilitating_mask")
        missing = [i for i, s in enumerate(self.sentences) if s not in self.document]
        if missing:
            raise ValueError(f"sentences: items {missing} are not found in the document")
        return self


def _request_model(kind: JobKind) -> type[_JobBase]:
    model = globals().get(KINDS[kind].request)
    if not (isinstance(model, type) and issubclass(model, _JobBase)):
        raise TypeError(
            f"app.kinds: kind {kind.value!r} names request model {KINDS[kind].request!r}, "
            "which is not a job model of app.schemas"
        )
    return model


REQUEST_MODELS: dict[JobKind, type[_JobBase]] = {kind: _request_model(kind) for kind in KINDS}
"""Each kind's request model, as :mod:`app.kinds` names it."""

if TYPE_CHECKING:
    # mypy cannot read a union built at run time: to it a request is any job model, and
    # code that needs one kind's fields narrows with isinstance.
    JobRequest: TypeAlias = _JobBase
else:
    # The discriminated union of every kind's model, built from the kind table: what the
    # API validates a submission with and the workers read parameters with.
    JobRequest = Annotated[Union[tuple(REQUEST_MODELS.values())], Field(discriminator="kind")]  # noqa: UP007


def role_fields(model: type[BaseModel], role: FieldRole) -> tuple[str, ...]:
    """The fields of ``model`` marked ``role``, in order; a nested model's as
    ``field.subfield`` (a trace's ``gradients.target``)."""
    found: list[str] = []
    for name, info in model.model_fields.items():
        if role in info.metadata:
            found.append(name)
        for nested in _models_in(info.annotation):
            found += [f"{name}.{sub}" for sub in role_fields(nested, role)]
    return tuple(found)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, UnionType) or getattr(annotation, "__origin__", None) is Union:
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def field_value(job: BaseModel | dict[str, Any], path: str) -> Any:
    """The value at ``field`` or ``field.subfield`` of a job or its parameters (None if unset)."""
    value: Any = job
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value is None:
            return None
    return value


class JobError(BaseModel):
    type: str
    message: str


class JobProgress(BaseModel):
    stage: str
    step: int
    total: int
    loss: float | None = None


class TensorInfo(BaseModel):
    dtype: str
    shape: list[int]


class JobEstimate(BaseModel):
    """What the API estimated at submission, from the model's published shape."""

    result_bytes: int = Field(description="Bytes of the result's tensors.")
    peak_bytes: int = Field(description="Peak bytes of the job's activations (a model of them).")
    tokens: Literal["counted", "guessed"] = Field(
        description="counted: with the model's own tokenizer, so result_bytes is exact; "
        "guessed: from the texts' bytes (no worker had published a fast tokenizer)."
    )


class JobDocument(BaseModel):
    id: str
    kind: JobKind
    model: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = Field(None, description="0 is next; only while queued.")
    progress: JobProgress | None = None
    retries: int = Field(
        0, description="Times it was queued again after losing its worker (retry_lost_jobs)."
    )
    error: JobError | None = None
    summary: dict[str, Any] | None = None
    tensors: dict[str, TensorInfo] | None = None
    estimate: JobEstimate | None = Field(
        None, description="Its cost as estimated at submission (null: no shape published yet)."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="The job's parameters.")


class JobList(BaseModel):
    jobs: list[JobDocument]


class ModelInfo(BaseModel):
    name: str
    source: str = Field(description="Local directory or hub id it was loaded from.")
    family: str | None = None
    architecture: str | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = Field(None, description="Head width; null where it differs per layer.")
    head_dims: list[int] | None = Field(
        None, description="Head width of each layer (Gemma 4 widens its full-attention heads)."
    )
    hidden_size: int | None = None
    intermediate_size: int | None = Field(None, description="Width of the MLP's activations.")
    vocab_size: int | None = None
    max_context: int | None = None
    dtype: str | None = None
    device: str | None = None
    model_bytes: int | None = Field(None, description="Bytes of its weights and buffers.")
    device_memory_bytes: int | None = Field(
        None, description="Memory of the device it runs on (a GPU's, or the host's on the CPU)."
    )
    resident: list[str] = Field(default_factory=list, description="Workers holding it loaded.")
    worker_threads: dict[str, int] = Field(
        default_factory=dict,
        description="CPU threads of each live worker serving it (worker_threads), by worker.",
    )
    queue_depth: int = 0
    running: int = 0
    worker_alive: bool = False
    status: Literal["ready", "failed", "waiting"] = Field(
        "waiting",
        description="ready: a live worker serves it; failed: no live worker could load it "
        "(see error; its jobs get 503); waiting: no live worker has loaded it yet.",
    )
    error: str | None = Field(None, description="Why the model could not be loaded.")
    tokenizer_sha256: str | None = Field(
        None,
        description="Hash of the fast tokenizer its worker published, which the API counts "
        "tokens with at submission (null: none, token counts are guessed).",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class DatasetInfo(BaseModel):
    id: str
    rows: int
    columns: list[str]
