"""Job events for the API's event streams: one Redis subscription per API process.

A stream that blocked on a Redis subscription of its own held a thread of the API's
pool (and a Redis connection) while its job ran; forty clients waiting on their jobs
took every thread, and the API stopped answering anything else until a keep-alive
freed one. Here one task subscribes to every job's channel and hands each message
to the streams that follow that job, as asyncio queues: a waiting client costs a queue.
Each key may hold a bounded number of them open at once (:meth:`EventHub.hold`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import redis
import redis.asyncio

from app.keys import events_channel

log = logging.getLogger(__name__)

LOST = b""
"""Put in every inbox when the subscription breaks: the streams end with an error (their
clients reconnect), as events published before it is back would be missed."""
RECONNECT_S = 1.0
READY_TIMEOUT_S = 2.0
STOP_RETRY_S = 0.2
_CHANNELS = events_channel("*")
_PREFIX = events_channel("")


class TooManyStreams(Exception):
    """A key already holds as many streams and waiting requests as it may."""


class EventHub:
    """Every job's events from one pattern subscription, dispatched by job id."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._inboxes: defaultdict[str, set[asyncio.Queue[bytes]]] = defaultdict(set)
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._held: Counter[str] = Counter()

    def hold(self, owner: str, cap: int) -> Callable[[], None]:
        """A place for one more open stream or waiting request of ``owner`` (at most
        ``cap`` in this process), or TooManyStreams; call what it returns to give the
        place back (once; further calls do nothing)."""
        if self._held[owner] >= cap:
            raise TooManyStreams(owner)
        self._held[owner] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._held[owner] -= 1
                if self._held[owner] <= 0:
                    del self._held[owner]

        return release

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        """Cancel the subscription loop, again while it runs: cancelled as it connects
        (an API stopped right after it started), it can hang closing the half-open
        connection, and a second cancel ends that."""
        if self._task is not None:
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=STOP_RETRY_S)

    @asynccontextmanager
    async def subscription(self, job_id: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """The raw messages of ``job_id``'s channel from now on (``LOST`` if the
        subscription breaks). Raises ``redis.ConnectionError`` while Redis is away."""
        try:
            await asyncio.wait_for(self._ready.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            raise redis.ConnectionError("no subscription to job events (Redis is away)") from None
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._inboxes[job_id].add(inbox)
        try:
            yield inbox
        finally:
            inboxes = self._inboxes[job_id]
            inboxes.discard(inbox)
            if not inboxes:
                del self._inboxes[job_id]

    async def _run(self) -> None:
        while True:
            conn = redis.asyncio.Redis.from_url(self._url, socket_connect_timeout=2)
            pubsub = conn.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(_CHANNELS)
                self._ready.set()
                async for message in pubsub.listen():
                    self._dispatch(message)
            except (redis.RedisError, OSError) as exc:
                if self._ready.is_set():
                    log.warning("job event subscription lost: %s", exc)
                self._lose()
            except Exception:  # a bug must not end the streams' only source for good
                log.exception("job event subscription failed; subscribing again")
                self._lose()
            finally:
                self._ready.clear()
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()
                    await conn.aclose()
            await asyncio.sleep(RECONNECT_S)

    def _dispatch(self, message: dict[str, object]) -> None:
        channel, data = message.get("channel"), message.get("data")
        if not (message.get("type") == "pmessage" and isinstance(channel, bytes)):
            return
        if not isinstance(data, bytes):
            return
        for inbox in self._inboxes.get(channel.decode().removeprefix(_PREFIX), ()):
            inbox.put_nowait(data)

    def _lose(self) -> None:
        for inboxes in self._inboxes.values():
            for inbox in inboxes:
                inbox.put_nowait(LOST)
