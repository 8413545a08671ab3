"""Runner wake-ups across replicas, over PostgreSQL's LISTEN/NOTIFY.

A runner's long-poll heartbeat is parked on one replica (`RunnerSignals`); a change for that
runner (a session placed, made ready, stopped) may be made on another.  Each replica publishes
its changes on one channel and listens to the others', so the parked poll answers at once
instead of when its wait runs out.  Best effort by design: a lost notification costs only the
wait (the poll re-reads the database when it ends), so failures are logged and retried, never
raised into a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid

import psycopg
from sqlalchemy import make_url

from offload.server.services.signals import RunnerSignals

log = logging.getLogger(__name__)

CHANNEL = "offload_runner_changes"
RECONNECT_AFTER_S = 1.0


def libpq_url(sqlalchemy_url: str) -> str:
    """The libpq URI of a `postgresql+psycopg://` SQLAlchemy URL (same host, socket, options)."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(False)


class PostgresWakeups:
    def __init__(self, database_url: str, signals: RunnerSignals) -> None:
        self._url = libpq_url(database_url)
        self._signals = signals
        self._origin = uuid.uuid4().hex[:12]  # our own notifications come back: skip them
        self._send_lock = threading.Lock()
        self._sender: psycopg.Connection[tuple[object, ...]] | None = None

    def publish(self, runner_id: str) -> None:
        """Tell the other replicas (from a worker thread: never blocks the event loop)."""
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, self._send, runner_id)

    def _send(self, runner_id: str) -> None:
        payload = f"{self._origin}:{runner_id}"
        with self._send_lock:
            try:
                if self._sender is None or self._sender.closed:
                    self._sender = psycopg.connect(self._url, autocommit=True)
                self._sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            except psycopg.Error as exc:
                log.warning("could not notify the other replicas of runner %s: %s", runner_id, exc)
                if self._sender is not None:
                    self._sender.close()
                self._sender = None

    async def listen(self) -> None:
        """Deliver the other replicas' changes to the runners' parked polls, until cancelled."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True
                ) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    async for notice in connection.notifies():
                        origin, _, runner_id = notice.payload.partition(":")
                        if origin != self._origin and runner_id:
                            self._signals.wake(runner_id)
            except psycopg.Error as exc:
                log.warning("runner wake-ups from other replicas paused: %s", exc)
                await asyncio.sleep(RECONNECT_AFTER_S)

    def close(self) -> None:
        with self._send_lock, contextlib.suppress(psycopg.Error):
            if self._sender is not None:
                self._sender.close()
