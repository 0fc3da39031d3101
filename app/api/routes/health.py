"""Liveness."""

from __future__ import annotations

from fastapi import APIRouter

from app import __version__
from app.api.deps import RedisDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(conn: RedisDep, settings: SettingsDep) -> dict[str, str | None]:
    """200 while the API runs; says whether Redis answers (a 503 comes from the handler if
    not). ``instance``: what ``lens serve`` gave this API, so it knows it reached its own."""
    conn.ping()
    return {"status": "ok", "version": __version__, "instance": settings.instance}
