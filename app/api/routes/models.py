"""The models this server serves, their shape, and how busy they are."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from app import queue
from app.api.deps import OwnerDep, RedisDep, SettingsDep
from app.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def _model_info(name: str, source: str, conn, reported: dict, workers: dict) -> ModelInfo:
    holders = sorted(w for w, info in workers.items() if name in info.get("models", []))
    return ModelInfo.model_validate(
        {
            **reported.get(name, {}),
            "name": name,
            "source": source,
            "resident": holders,
            "queue_depth": queue.queue_depth(conn, name),
            "running": queue.running_count(conn, name),
            "worker_alive": bool(holders),
        }
    )


@router.get("", response_model=ModelList)
def list_models(_: OwnerDep, settings: SettingsDep, conn: RedisDep) -> ModelList:
    """Served models: shape (once a worker has loaded them), queue depth, running jobs, workers."""
    reported, workers = queue.model_infos(conn), queue.live_workers(conn)
    return ModelList(
        models=[
            _model_info(name, spec.source, conn, reported, workers)
            for name, spec in sorted(settings.models.items())
        ]
    )


@router.get("/{name}", response_model=ModelInfo)
def get_model(name: str, _: OwnerDep, settings: SettingsDep, conn: RedisDep) -> ModelInfo:
    if name not in settings.models:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name!r} is not served here")
    return _model_info(
        name, settings.models[name].source, conn, queue.model_infos(conn), queue.live_workers(conn)
    )
