"""Engine and transactions.

Services are plain synchronous functions of an ORM session; `Database.run` runs one in a worker
thread inside one transaction, so the event loop never blocks on the database and no transaction
is ever held across an `await` (a network call or a long-poll wait).

Two databases, one meaning of a transaction:

- Write transactions (`run`, `call`, `transaction()`) take their turn: one at a time, each
  waiting up to `LOCK_TIMEOUT_S` for the one before to end.  Services read, decide and write
  in one transaction (capacity, limits, "does this name exist yet") and rely on no other writer
  changing what they read meanwhile.
- Read-only transactions (`read`, `transaction(read_only=True)`) see one consistent snapshot,
  never wait for a writer and are refused any write.
- Row-locked transactions (`run_row_locked`, `transaction(row_locked=True)`) are for the hot
  writes confined to rows they lock themselves (`SELECT … FOR UPDATE`), such as an activity
  report's stamp: on PostgreSQL they skip the turn, so that they neither wait for nor hold up
  the other writers (bench/load.py: with every write taking its turn, 26 of 29 connections
  were waiting for it).  They write only the rows they locked, and only where a read of other
  rows that is a moment out of date does no harm; anything more (a state change, a ledger
  write) belongs in a write transaction.  On SQLite, which has one writer anyway, they are
  write transactions.  `run_row_locked_columns` runs one on a plain connection, for work of
  plain columns only (the activity lane).

SQLite (the embedded default, `offload up`) gets WAL (readers never wait for the writer),
foreign keys, a busy timeout, and `BEGIN IMMEDIATE` for write transactions: a deferred
transaction that reads and then writes can fail at once with "database is locked" when another
writer committed in between, while an immediate one waits its turn.  Read-only work uses a plain
deferred `BEGIN`.

PostgreSQL (production, `postgresql+psycopg://…`, psycopg 3) runs at READ COMMITTED; a write
transaction first takes a transaction-scoped advisory lock (`WRITE_LOCK_KEY`), the counterpart of
`BEGIN IMMEDIATE`, so writers are serialised across every process on the database (the server,
a second one starting, the operator's commands); it is released at commit or rollback.  Without
it, READ COMMITTED would let two concurrent starts both see a free slot on a full runner.
Read-only transactions are `REPEATABLE READ READ ONLY`: one snapshot, no lock, and a write in
one is an error.  Connections come from a pool, checked before use (a restarted database or a
proxy that dropped an idle connection costs a reconnect, not a failed request).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, Executable, create_engine, event, make_url
from sqlalchemy.engine import URL, CursorResult
from sqlalchemy.orm import Session, sessionmaker

from offload.core.errors import InvalidInput

P = ParamSpec("P")
T = TypeVar("T")

_READ_ONLY = "offload_read_only"
_ROW_LOCKED = "offload_row_locked"
LOCK_TIMEOUT_S = 30
SQLITE_BUSY_TIMEOUT_MS = LOCK_TIMEOUT_S * 1000

# PostgreSQL: an arbitrary 64-bit key, the same in every process of one installation.
WRITE_LOCK_KEY = 0x0FF10AD_0001
# Pool: `Database.run` and `read` use the default thread pool (at most 32 threads), and a
# transaction holds its connection only while it runs; past pool + overflow callers queue.
PG_POOL_SIZE = 10
PG_MAX_OVERFLOW = 20
PG_POOL_TIMEOUT_S = 30
PG_POOL_RECYCLE_S = 1800  # below the idle cut-off of common proxies and load balancers
PG_CONNECT_TIMEOUT_S = 10
PG_APPLICATION_NAME = "offload-server"


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return _make_postgresql_engine(parsed)
    if backend != "sqlite":
        raise InvalidInput(
            f"Databases of kind {backend!r} are not supported.",
            "Set OFFLOAD_DATABASE_URL to postgresql+psycopg://USER@HOST:PORT/DATABASE, or unset "
            "it for SQLite in OFFLOAD_DATA_DIR.",
        )
    _create_private_file(parsed.database)
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


def _make_postgresql_engine(url: URL) -> Engine:
    if url.drivername != "postgresql+psycopg":
        # psycopg 3 is the one driver installed and tested; `postgresql://` would pick psycopg2.
        url = url.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    if "application_name" not in url.query:
        connect_args["application_name"] = PG_APPLICATION_NAME
    engine = create_engine(
        url,
        connect_args=connect_args,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        pool_timeout=PG_POOL_TIMEOUT_S,
        pool_recycle=PG_POOL_RECYCLE_S,
        pool_pre_ping=True,
    )
    _configure_postgresql(engine)
    return engine


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            # Waiting for the write lock (or any row lock) ends like SQLite's busy timeout.
            cursor.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
            # Dates the database itself derives (a day's start, psql's display) are UTC days,
            # like the clock's.
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        options = connection.get_execution_options()
        if not options.get(_READ_ONLY, False) and not options.get(_ROW_LOCKED, False):
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")


def _read_only_options(engine: Engine) -> dict[str, Any]:
    options: dict[str, Any] = {_READ_ONLY: True}
    if engine.dialect.name == "postgresql":
        options.update(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return options


class Database:
    """One engine per process; `run`/`read` for async callers, `transaction` for sync ones."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # Objects stay readable after commit: services return them only as plain data anyway.
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = sessionmaker(
            self.engine.execution_options(**_read_only_options(self.engine)),
            expire_on_commit=False,
        )
        self._row_locked_engine = self.engine.execution_options(**{_ROW_LOCKED: True})
        self._row_writer = sessionmaker(self._row_locked_engine, expire_on_commit=False)
        # SQLite: this process's writers queue on a lock of their own instead of in SQLite's
        # busy handler, which sleeps and retries (bench/load.py: p99 1.4 s -> 0.23 s at 25
        # activity reports a second).  Other processes on the file still meet the busy timeout.
        self._sqlite_writers = threading.RLock() if self.engine.dialect.name == "sqlite" else None

    @contextmanager
    def transaction(self, read_only: bool = False, row_locked: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        maker = self._reader if read_only else self._row_writer if row_locked else self._writer
        queue = self._sqlite_writers if not read_only else None
        with queue or contextlib.nullcontext(), maker.begin() as session:
            yield session

    @contextmanager
    def row_locked_connection(self) -> Iterator[Connection]:
        """A row-locked transaction on a plain connection, without an ORM session: for work of
        plain columns only (services/activity_lane.py), where the session's own upkeep would be
        a good part of the cost."""
        with (
            self._sqlite_writers or contextlib.nullcontext(),
            self._row_locked_engine.begin() as conn,
        ):
            yield conn

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
        return await self._in_thread(False, False, fn, *args, **kwargs)

    async def run_row_locked(
        self,
        fn: Callable[Concatenate[Session, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Like `run`, in a row-locked transaction: `fn` locks the rows it writes."""
        return await self._in_thread(False, True, fn, *args, **kwargs)

    async def run_row_locked_columns(
        self,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run `fn(connection, …)` in a row-locked transaction on a worker thread (see
        `row_locked_connection`)."""

        def _call() -> T:
            with self.row_locked_connection() as connection:
                return fn(connection, *args, **kwargs)

        return await asyncio.to_thread(_call)

    async def read(
        self,
        fn: Callable[Concatenate[Session, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Like `run`, in a read-only transaction (never waits for the writer)."""
        return await self._in_thread(True, False, fn, *args, **kwargs)

    async def _in_thread(
        self,
        read_only: bool,
        row_locked: bool,
        fn: Callable[Concatenate[Session, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        def _call() -> T:
            with self.transaction(read_only=read_only, row_locked=row_locked) as session:
                return fn(session, *args, **kwargs)

        return await asyncio.to_thread(_call)

    def dispose(self) -> None:
        self.engine.dispose()


# Where statements of plain columns run: a transaction's ORM session, or a plain connection.
Columns = Session | Connection


def execute_columns(
    db: Columns, statement: Executable, params: Any = None
) -> CursorResult[*tuple[Any, ...]]:
    """Run a statement of plain columns (no mapped objects in or out) on the transaction's own
    connection.

    `Session.execute` does ORM work per statement (its compile state, its result wrapping) that
    such a statement does not need: 0.13-0.2 ms of CPU each here, timed alone on SQLite and
    PostgreSQL (docs/operations.md has what it did for whole requests).  Pending changes are
    flushed first, as `Session.execute`'s autoflush would, so the statement sees them; a plain
    connection has none, and runs it as it is.
    """
    if isinstance(db, Connection):
        return db.execute(statement, params)
    db.flush()
    return db.connection().execute(statement, params)


def insert_for(db: Session) -> Any:
    """The dialect's INSERT (SQLite's or PostgreSQL's): both offer `on_conflict_do_nothing`."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return pg_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
