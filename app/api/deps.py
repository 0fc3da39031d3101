"""Dependencies shared by the routes, declared once as ``Annotated`` aliases.

Those that do no I/O are ``async``: FastAPI runs a plain ``def`` dependency in its thread
pool, and the hop to a thread and back costs more than the work itself.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

import redis
import redis.asyncio
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.blobstore import BlobStore
from app.core.config import Settings
from app.events import EventHub
from app.jobstore import ANONYMOUS, JobRecord, JobStore
from app.keys import is_job_id


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


async def get_async_redis(request: Request) -> redis.asyncio.Redis:
    return request.app.state.aredis


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


async def get_events(request: Request) -> EventHub:
    return request.app.state.events


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[redis.asyncio.Redis, Depends(get_async_redis)]
StoreDep = Annotated[JobStore, Depends(get_store)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
EventsDep = Annotated[EventHub, Depends(get_events)]

_bearer = HTTPBearer(auto_error=False, description="An API key, when the server has keys.")


def owner_of_key(key: str) -> str:
    """A stable, non-secret id for a key: records never hold the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


async def get_owner(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's owner id: from its key, compared with every configured key in constant
    time (no early exit, so timing does not tell how much of a key matched)."""
    owner = _authenticate(settings, credentials)
    request.state.owner = owner
    return owner


def _authenticate(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> str:
    keys = settings.key_values()
    if not keys:
        return ANONYMOUS
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "an API key is required: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = _digest(credentials.credentials)
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, _digest(key))
    if not matched:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return owner_of_key(credentials.credentials)


def _digest(key: str) -> bytes:
    """Keys are compared as digests, so the comparison takes as long whatever their length."""
    return hashlib.sha256(key.encode()).digest()


OwnerDep = Annotated[str, Depends(get_owner)]


async def get_owned_job(job_id: str, owner: OwnerDep, aconn: AsyncRedisDep) -> JobRecord:
    """The job if it exists and is the caller's; else 404 (never 403: ids stay private)."""
    record = await JobStore.get_async(aconn, job_id) if is_job_id(job_id) else None
    if record is None or record.owner != owner:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} not found")
    return record


OwnedJobDep = Annotated[JobRecord, Depends(get_owned_job)]
