"""Service configuration: environment variables (``LENS_*``) and an optional TOML file."""

from __future__ import annotations

import json
import logging
import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_PORT = 8000
DEFAULT_DATA_DIR = Path("data")
CONFIG_ENV = "LENS_CONFIG"
GIB = 1024**3
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


class ModelSpec(BaseModel):
    """One served model, as the operator names it."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Local directory or hub id for from_pretrained.")
    device: str | None = Field(None, description="e.g. 'cuda:1' or 'cpu'; default CUDA if present.")
    dtype: str | None = Field(None, description="float32, float16 or bfloat16; default by device.")
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="Spread a model too big for one GPU over several, with accelerate: "
        "'auto', 'balanced', 'balanced_low_0', 'sequential', or a map of module names to "
        "GPU indexes, 'cpu' or 'disk' (offloaded to the data directory). Replaces device; "
        "needs the accelerate package (pip install 'lens-server[multi-gpu]').",
    )
    trust_remote_code: bool = False
    max_batch_tokens: int = Field(16384, ge=1, description="Token budget of one forward pass.")
    batch_wait_ms: float = Field(
        50.0,
        ge=0,
        description="When a worker starts a score or trace job while more jobs of that kind "
        "for this model are being submitted, it waits up to this long for them to be queued, "
        "so that they share its forward pass (0: never wait). With nothing in flight it "
        "starts at once.",
    )
    fit_pause_ms: float = Field(
        250.0,
        ge=0,
        description="A running chg, cchg or ablate job of this model serves the score and "
        "trace jobs (without gradients) queued for it between two of its steps, ungated, in "
        "shared passes of max_batch_tokens, for up to this long per pause (then one pass "
        "more at most); the fit's result is unchanged. 0: short jobs wait for the fit.",
    )
    workers: list[str] | None = Field(
        None,
        description="Names of the workers that serve it (lens worker --name); default every "
        "worker. Assigns models to GPUs: one worker per GPU, each named.",
    )

    @field_validator("source")
    @classmethod
    def _home(cls, source: str) -> str:
        """``~/models/x`` from a config file (no shell expands it there) is a local path."""
        return os.path.expanduser(source) if source.startswith("~") else source

    @model_validator(mode="after")
    def _one_placement(self) -> ModelSpec:
        if self.device is not None and self.device_map is not None:
            raise ValueError("give either device or device_map, not both")
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"device_map must be a map of module names to devices or one of "
                f"{list(DEVICE_MAP_STRATEGIES)}, got {self.device_map!r}"
            )
        return self

    def served_by(self, worker: str) -> bool:
        return self.workers is None or worker in self.workers


class Limits(BaseModel):
    """Operator limits; each one reported by name in the error that enforces it.

    The API checks what it can count without a tokenizer (413 or 422 at submission),
    then counts tokens with the tokenizer the model's worker published (token limits:
    413; else it guesses them from the texts' bytes), and estimates the result's size and
    the peak memory from the model's published shape (413). The worker counts the tokens
    and estimates again before any compute; it checks the result's tensors once more
    before anything is written (InvalidParameter, LimitExceeded).
    """

    model_config = ConfigDict(extra="forbid")

    max_texts: int = Field(1024, ge=1, description="Texts in any one text field of a job.")
    max_text_chars: int = Field(100_000, ge=1, description="Characters in any one text.")
    max_tokens_per_text: int = Field(8192, ge=1, description="Tokens in any one text.")
    max_tokens_per_job: int = Field(1_048_576, ge=1, description="Tokens in all texts.")
    max_masks: int = Field(64, ge=1, description="num_masks of a chg or cchg job.")
    max_mask_batch: int = Field(
        4096, ge=1, description="num_masks × batch_size: sequences in one gated forward pass."
    )
    max_updates: int = Field(10_000, ge=1, description="num_updates + num_reg_updates.")
    max_result_bytes: int = Field(
        2 * GIB, ge=1, description="Size of a result's tensors; the worker refuses above it."
    )
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="A request body.")
    max_dataset_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="An uploaded data set.")
    max_active_jobs_per_key: int = Field(32, ge=1, description="Queued + running jobs per key.")
    max_gradient_accum_steps: int = Field(
        64, ge=1, description="gradient_accum_steps of a chg job: passes per update."
    )
    max_fit_rows: int = Field(
        4 * 1024 * 1024,
        ge=1,
        description="Prompts a gate fit draws in all, planned up front: updates × "
        "gradient_accum_steps × min(batch_size, prompts).",
    )
    max_top_k: int = Field(1024, ge=1, description="top_k of a score job.")
    max_job_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="Estimated peak memory of one job's activations; default: the memory of "
        "its model's device less the model (as its worker published them).",
    )
    max_streams_per_key: int = Field(
        64,
        ge=1,
        description="Open event streams plus held result requests (?wait=) per key, per API "
        "process (twice max_active_jobs_per_key by default: a client following each of its "
        "jobs twice stays under it).",
    )
    max_datasets_per_key: int = Field(64, ge=1, description="Stored data sets per key.")
    max_dataset_bytes_per_key: int = Field(
        1024 * 1024 * 1024, ge=1024, description="Bytes of stored data sets per key."
    )


logger = logging.getLogger(__name__)
RENAMED = {"torch_threads": "worker_threads"}
"""Settings that were renamed: an old config naming one is told the new name."""


class Settings(BaseSettings):
    """Everything the API, the workers and ``lens serve`` need to agree on."""

    model_config = SettingsConfigDict(env_prefix="LENS_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password_file: Path | None = Field(
        None,
        description="A file holding the Redis password (a compose secret, say), put into "
        "redis_url; keeps the password out of the environment and off command lines.",
    )
    data_dir: Path = DEFAULT_DATA_DIR
    results_dir: Path | None = Field(
        None,
        description="Where result files go (default <data_dir>/blobs). Faster storage "
        "(tmpfs, local NVMe) makes large results quicker to write; results on tmpfs do not "
        "survive a reboot. Every API and worker process must see the same directory.",
    )
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = Field(
        None, description="A file with one API key per line, added to api_keys."
    )
    job_timeout_s: int = Field(6 * 3600, ge=1, description="A job running longer is failed.")
    result_ttl_s: int = Field(
        7 * 24 * 3600, ge=1, description="Finished jobs and their results expire after this."
    )
    heartbeat_s: float = Field(
        5.0,
        gt=0,
        description="How often a worker reports it is alive; a worker silent for 3 beats is "
        "dead, and its job is failed (or re-queued) within 4 beats of its death.",
    )
    retry_lost_jobs: bool = Field(
        False, description="Re-queue (once) a job whose worker died or was shut down."
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long a worker lets its job run before stopping it."
    )
    sweep_interval_s: float = Field(
        300.0, gt=0, description="How often the API deletes the blobs of expired jobs."
    )
    worker_memory_mb: int | None = Field(
        None,
        ge=1,
        description="CPU workers: host memory a worker may take beyond its loaded models "
        "(an address-space limit); a job needing more fails as out of memory.",
    )
    cuda_memory_fraction: float | None = Field(
        None, gt=0, le=1, description="CUDA workers: the share of each GPU a worker may use."
    )
    worker_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads each worker gives torch (intra-op, and as many inter-op), "
        "set before it loads anything. Default: the host's cores ÷ local_workers, at least 1; "
        "at most 2 on a worker whose models all live on GPUs. Reported in the heartbeat and "
        "GET /v1/models.",
    )
    local_workers: int = Field(
        1,
        ge=1,
        description="Worker processes sharing this host's cores, which the default "
        "worker_threads divides between them; lens serve sets it to its --workers.",
    )
    worker_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="How far below the API's a worker's CPU priority is (a Unix nice "
        "increment): the API and Redis answer every client, a worker's compute can wait a "
        "moment for them when both want a core. 0: the API's priority (e.g. where other "
        "users' processes compete with workers for the CPUs).",
    )
    worker_keep_freed_mib: int = Field(
        1024,
        ge=0,
        le=2047,
        description="Memory a worker's jobs free that it keeps for the next jobs, in MiB, "
        "instead of giving it back to the kernel and faulting it in again (glibc only). "
        "The worker's resident memory then stays near its peak; 0: glibc's defaults.",
    )
    max_resident_bytes: int | None = Field(
        None, ge=1, description="Parameter bytes a worker keeps loaded; LRU models evicted beyond."
    )
    max_resident_models: int | None = Field(
        None, ge=1, description="Models a worker keeps loaded; LRU models evicted beyond."
    )
    log_format: Literal["kv", "json"] = "kv"
    log_level: str = "INFO"
    log_max_mib: int = Field(
        16, ge=1, description="lens serve: a child's log file is rotated at this size."
    )
    log_files_kept: int = Field(
        3, ge=0, description="lens serve: rotated log files kept per child (NAME.log.1, …)."
    )
    instance: str | None = Field(
        None,
        description="Set by lens serve for its API, which reports it in /healthz: the "
        "supervisor then knows it reached its own API, not another server on the port.",
    )
    limits: Limits = Field(default_factory=Limits)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, data: Any) -> Any:
        """A setting the server does not know is ignored, but said, so that a typo or a
        retired name in a config file does not pass for a working one."""
        if isinstance(data, dict):
            for key in sorted(set(data) - set(cls.model_fields)):
                hint = f"; use {RENAMED[key]!r}" if key in RENAMED else ""
                logger.warning("unknown setting %r is ignored%s", key, hint)
        return data

    @model_validator(mode="after")
    def _read_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            known = set(self.key_values())
            for key in read_keys_file(self.api_keys_file):
                if key not in known:
                    self.api_keys.append(SecretStr(key))
                    known.add(key)
            self.api_keys_file = None
        if self.redis_password_file is not None:
            password = self.redis_password_file.read_text().strip()
            parts = urlsplit(self.redis_url)
            if password and parts.password is None:
                host = parts.netloc.rpartition("@")[2]
                auth = f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@"
                self.redis_url = urlunsplit(parts._replace(netloc=auth + host))
            self.redis_password_file = None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    @property
    def blob_dir(self) -> Path:
        return self.results_dir or self.data_dir / "blobs"

    @property
    def dataset_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def worker_ttl_s(self) -> float:
        """A worker silent this long is dead."""
        return 3 * self.heartbeat_s

    def key_values(self) -> list[str]:
        return [k.get_secret_value() for k in self.api_keys]

    def models_of(self, worker: str) -> list[str]:
        """The models the config assigns to the worker named ``worker``."""
        return sorted(name for name, spec in self.models.items() if spec.served_by(worker))

    def environment(self, *, keys: bool = True) -> dict[str, str]:
        """``LENS_*`` variables that give a child process these settings (the API keys only
        with ``keys``: workers never need them)."""
        env: dict[str, str] = {}
        dumped = self.model_dump(mode="json", exclude={"api_keys", "api_keys_file"})
        for name, value in dumped.items():
            if value is not None:
                env[f"LENS_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        if keys:
            env["LENS_API_KEYS"] = ",".join(self.key_values())
        return env


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and ``#`` comments are skipped."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the file named by ``LENS_CONFIG`` (lowest priority: env and flags win)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return {}
        with open(path, "rb") as f:
            return tomllib.load(f)


def parse_model_arg(arg: str) -> tuple[str, ModelSpec]:
    """``NAME=PATH_OR_HUB_ID`` from the command line."""
    name, sep, source = arg.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--model expects NAME=PATH_OR_HUB_ID, got {arg!r}")
    return name, ModelSpec(source=source)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, built once on first use (tests call ``cache_clear``)."""
    return Settings()
