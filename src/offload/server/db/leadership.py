"""One replica runs the background clock at a time (PostgreSQL).

Every replica could tick: each change is claimed under a row lock and re-checked, so it would
still happen once.  But a tick reads the live sessions something may be due for (all of them
before lifecycle.due_candidates; bench/load.py: 0.05-0.07 ms per session read), and done by N
replicas that work is done N times.  So the replica holding a
session-level advisory lock ticks and the others only check, once per tick, whether it is free.
The lock lives as long as the holder's connection: a replica that dies, or loses the database,
lets it go, and another takes over at its next tick.  SQLite has one process: no lock needed.
"""

from __future__ import annotations

import logging

import psycopg

from offload.server.db.wakeups import libpq_url

log = logging.getLogger(__name__)

TICK_LOCK_KEY = 0x0FF10AD_0002  # the write lock is ..._0001 (db/engine.py)


class TickLeadership:
    def __init__(self, database_url: str) -> None:
        self._url = libpq_url(database_url)
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None
        self._leading = False

    def holds(self) -> bool:
        """Whether this replica ticks now (blocking: call it from a worker thread)."""
        try:
            if self._connection is None or self._connection.closed:
                self._connection = psycopg.connect(self._url, autocommit=True)
                self._leading = False
            if self._leading:
                self._connection.execute("SELECT 1")  # the lock lives while this connection does
            else:
                row = self._connection.execute(
                    "SELECT pg_try_advisory_lock(%s)", (TICK_LOCK_KEY,)
                ).fetchone()
                self._leading = bool(row and row[0])
                if self._leading:
                    log.info("this replica runs the background clock now")
        except psycopg.Error as exc:
            log.warning("background clock leadership unknown (%s); not ticking", exc)
            self.close()
        return self._leading

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg.Error:
                pass
        self._connection, self._leading = None, False
