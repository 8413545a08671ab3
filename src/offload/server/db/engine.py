"""Engine and transactions.

Services are plain synchronous functions of an ORM session; `Database.run` runs one in a worker
thread inside one transaction, so the event loop never blocks on the database and no transaction
is ever held across an `await` (a network call or a long-poll wait).

SQLite (the embedded default) gets WAL (readers never wait for the writer), foreign keys, a busy
timeout, and `BEGIN IMMEDIATE` for write transactions: a deferred transaction that reads and then
writes can fail at once with "database is locked" when another writer committed in between, while
an immediate one waits its turn.  Read-only work uses a plain deferred `BEGIN`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

P = ParamSpec("P")
T = TypeVar("T")

_READ_ONLY = "offload_read_only"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    _create_private_file(make_url(url).database)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    _configure_sqlite(engine)
    return engine


def _create_private_file(path: str | None) -> None:
    """Create the SQLite file owner-only (it holds password and token hashes); SQLite gives its
    -wal and -shm files the same mode."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


class Database:
    """One engine per process; `run`/`read` for async callers, `transaction` for sync ones."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # Objects stay readable after commit: services return them only as plain data anyway.
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = sessionmaker(
            self.engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False
        )

    @contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        maker = self._reader if read_only else self._writer
        with maker.begin() as session:
            yield session

    def call(
        self,
        fn: Callable[Concatenate[Session, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        with self.transaction() as session:
            return fn(session, *args, **kwargs)

    async def run(
        self,
        fn: Callable[Concatenate[Session, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run `fn(session, …)` in one write transaction on a worker thread."""

        def _call() -> T:
            return self.call(fn, *args, **kwargs)

        return await asyncio.to_thread(_call)

    async def read(
        self,
        fn: Callable[Concatenate[Session, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Like `run`, in a read-only transaction (on SQLite: never waits for the writer)."""

        def _call() -> T:
            with self.transaction(read_only=True) as session:
                return fn(session, *args, **kwargs)

        return await asyncio.to_thread(_call)

    def dispose(self) -> None:
        self.engine.dispose()
