"""The models this server serves, their shape, and how busy they are."""

from __future__ import annotations

from collections import Counter
from typing import Any

import redis
from fastapi import APIRouter, HTTPException, status

from app import presence, queue
from app.api.deps import OwnerDep, RedisDep, SettingsDep, StoreDep
from app.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def _model_info(
    name: str,
    source: str,
    conn: redis.Redis,
    reported: dict[str, Any],
    workers: dict[str, dict[str, Any]],
    running: Counter[str],
) -> ModelInfo:
    """Shape as the last worker that loaded it reported; liveness and thread budgets from
    current heartbeats. Failed: no live worker serves it and one could not load it (or,
    with no live worker at all, the last one to try could not)."""
    serving = [w for w, info in workers.items() if name in info.get("models", [])]
    holding = sorted(w for w in serving if name in workers[w].get("resident", []))
    shape = reported.get(name, {})
    reasons = [info["failed"][name] for info in workers.values() if name in info.get("failed", {})]
    error = None if serving else (reasons[0] if reasons else shape.get("error"))
    status = "ready" if serving else "failed" if error else "waiting"
    return ModelInfo.model_validate(
        {
            **shape,
            "name": name,
            "source": source,
            "resident": holding,
            "worker_threads": {
                w: workers[w]["worker_threads"] for w in serving if "worker_threads" in workers[w]
            },
            "queue_depth": queue.queue_depth(conn, name),
            "running": running.get(name, 0),
            "worker_alive": bool(serving),
            "status": status,
            "error": error,
        }
    )


@router.get("", response_model=ModelList)
def list_models(_: OwnerDep, settings: SettingsDep, conn: RedisDep, store: StoreDep) -> ModelList:
    """Served models: shape (once a worker has loaded them), jobs queued and running, and
    whether a live worker serves each (from the workers' heartbeats)."""
    reported, workers = presence.model_infos(conn), presence.live_workers(conn)
    running = store.running_counts()
    return ModelList(
        models=[
            _model_info(name, spec.source, conn, reported, workers, running)
            for name, spec in sorted(settings.models.items())
        ]
    )


@router.get("/{name}", response_model=ModelInfo)
def get_model(
    name: str, _: OwnerDep, settings: SettingsDep, conn: RedisDep, store: StoreDep
) -> ModelInfo:
    if name not in settings.models:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name!r} is not served here")
    return _model_info(
        name,
        settings.models[name].source,
        conn,
        presence.model_infos(conn),
        presence.live_workers(conn),
        store.running_counts(),
    )
