"""Each worker's share of the host's cores (``worker_threads``)."""

from __future__ import annotations

import pytest

from app.core.config import ModelSpec, Settings
from workers.threads import GPU_WORKER_THREADS, on_gpus, thread_budget


def settings(**overrides: object) -> Settings:
    return Settings(models={"m": ModelSpec(source="/m", device="cpu")}, **overrides)


@pytest.mark.parametrize(
    ("cores", "workers", "threads"), [(8, 1, 8), (8, 2, 4), (2, 2, 1), (3, 2, 1), (2, 4, 1)]
)
def test_by_default_the_workers_of_a_host_share_its_cores(
    cores: int, workers: int, threads: int
) -> None:
    assert thread_budget(settings(local_workers=workers), ["m"], cores=cores) == threads


def test_an_explicit_budget_wins() -> None:
    assert thread_budget(settings(worker_threads=3, local_workers=4), ["m"], cores=2) == 3


@pytest.mark.parametrize(
    ("spec", "gpu"),
    [
        (ModelSpec(source="/m"), True),
        (ModelSpec(source="/m", device="cuda:1"), True),
        (ModelSpec(source="/m", device="cpu"), False),
        (ModelSpec(source="/m", device_map="auto"), True),
        (ModelSpec(source="/m", device_map={"model": 0, "lm_head": "cuda:1"}), True),
        (ModelSpec(source="/m", device_map={"model": 0, "lm_head": "cpu"}), False),
    ],
)
def test_a_model_is_on_gpus_unless_placed_on_the_cpu(spec: ModelSpec, gpu: bool) -> None:
    assert on_gpus(spec) is gpu


@pytest.mark.gpu
def test_a_worker_whose_models_are_on_gpus_takes_few_threads() -> None:
    on_gpu = Settings(models={"m": ModelSpec(source="/m")})
    assert thread_budget(on_gpu, ["m"], cores=64) == GPU_WORKER_THREADS
