"""Liveness."""

from __future__ import annotations

from fastapi import APIRouter

from app import __version__
from app.api.deps import RedisDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(conn: RedisDep) -> dict[str, str]:
    """200 while the API runs; says whether Redis answers (a 503 comes from the handler if not)."""
    conn.ping()
    return {"status": "ok", "version": __version__}
