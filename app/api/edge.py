"""The network edge: what protects the API from browsers and from the network.

**Localhost mode** (no API keys): the API trusts any request that reaches it, so every
request must come from a program on this host, not from a web page that a user of this
host happens to open:

- A page on another site can re-resolve its own name to 127.0.0.1 (DNS rebinding) and
  then talk to the API as if same-origin; its requests still carry that name in
  ``Host``. A ``Host`` that is not a loopback name is refused (400).
- A page can post a form to any address without asking (no CORS preflight) as
  ``application/x-www-form-urlencoded``, ``multipart/form-data`` or ``text/plain``. A
  request with a body must say it is JSON (or, for data sets, one of their types): else
  415. A request whose ``Origin`` is another site's is refused (403).

**Every response** gets ``X-Content-Type-Options: nosniff`` and may not be framed
(``frame-ancestors 'none'``, ``X-Frame-Options: DENY``); a route may set a fuller
Content-Security-Policy of its own (the dashboard does).
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

from fastapi import status
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

JSON_TYPES = frozenset({"application/json"})
DATASET_TYPES = frozenset(
    {"application/json", "application/x-ndjson", "application/jsonl", "text/tab-separated-values"}
)
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_FRAMING = b"frame-ancestors 'none'"


def is_loopback(host: str) -> bool:
    """``localhost`` (and ``*.localhost``) or a loopback address, as in a ``Host`` header."""
    name = _hostname(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    """The name in a ``Host`` value: ``[::1]:8000`` → ``::1``, ``Localhost:80`` → ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class LocalhostGuard:
    """In localhost mode: a loopback ``Host`` (with ``check_host``: not when the operator
    chose to listen beyond localhost without keys), no foreign ``Origin``, JSON bodies only."""

    def __init__(self, app: ASGIApp, check_host: bool = True) -> None:
        self.app = app
        self.check_host = check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = _refusal(scope, self.check_host)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        code, detail = refusal
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _refusal(scope: Scope, check_host: bool) -> tuple[int, str] | None:
    headers = Headers(scope=scope)
    host = headers.get("host", "")
    if check_host and not is_loopback(host):
        return (
            status.HTTP_400_BAD_REQUEST,
            f"Host {host!r} is not this machine: without API keys the server answers only "
            "requests addressed to localhost (a defence against DNS rebinding)",
        )
    origin = headers.get("origin")
    if origin and origin != "null" and not is_loopback(urlsplit(origin).netloc):
        return (
            status.HTTP_403_FORBIDDEN,
            f"requests from pages of {origin} are refused: without API keys only this "
            "machine's own pages may call the server",
        )
    if scope["method"] in _WITH_BODY:
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        allowed = DATASET_TYPES if scope["path"].startswith("/v1/datasets") else JSON_TYPES
        if media not in allowed:
            return (
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {media or '(none)'!r} is not accepted here: send "
                f"{' or '.join(sorted(allowed))} (without API keys, a defence against "
                "cross-site form posts)",
            )
    return None


class SecurityHeaders:
    """Headers every response gets (a route's own values win)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(n, v) for n, v in _HEADERS if n not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", _FRAMING))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
