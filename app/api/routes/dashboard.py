"""The dashboard: one static page and its assets, shipped inside the package (no build step).

The page talks to the public /v1 API from the browser with the user's API key,
so these routes need no key themselves and hold no state.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

STATIC = files("app") / "static"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=_NO_CACHE)


@router.get("/static/{name}")
def asset(name: str) -> Response:
    """Only the named assets: nothing else under the package can be read through here."""
    if name not in ASSETS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no asset {name!r}")
    return Response((STATIC / name).read_bytes(), media_type=ASSETS[name], headers=_NO_CACHE)
