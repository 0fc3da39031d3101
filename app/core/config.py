"""Service configuration: environment variables (``LENS_*``) and an optional TOML file."""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_PORT = 8000
DEFAULT_DATA_DIR = Path("data")
CONFIG_ENV = "LENS_CONFIG"


class ModelSpec(BaseModel):
    """One served model, as the operator names it."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Local directory or hub id for from_pretrained.")
    device: str | None = Field(None, description="e.g. 'cuda:1' or 'cpu'; default CUDA if present.")
    dtype: str | None = Field(None, description="float32, float16 or bfloat16; default by device.")
    trust_remote_code: bool = False
    max_batch_tokens: int = Field(16384, ge=1, description="Token budget of one forward pass.")


class Limits(BaseModel):
    """Operator limits; each one reported by name in the 4xx that enforces it."""

    model_config = ConfigDict(extra="forbid")

    max_texts: int = Field(1024, ge=1)
    max_text_chars: int = Field(100_000, ge=1)
    max_masks: int = Field(64, ge=1)
    max_updates: int = Field(10_000, ge=1)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_dataset_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_active_jobs_per_key: int = Field(32, ge=1)


class Settings(BaseSettings):
    """Everything the API, the workers and ``lens serve`` need to agree on."""

    model_config = SettingsConfigDict(env_prefix="LENS_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = DEFAULT_DATA_DIR
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    job_timeout_s: int = Field(6 * 3600, ge=1, description="A job running longer is failed.")
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="Finished jobs expire after this.")
    heartbeat_s: float = Field(5.0, gt=0, description="How often a worker reports it is alive.")
    limits: Limits = Field(default_factory=Limits)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

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
        return self.data_dir / "blobs"

    @property
    def dataset_dir(self) -> Path:
        return self.data_dir / "datasets"

    def key_values(self) -> list[str]:
        return [k.get_secret_value() for k in self.api_keys]


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
