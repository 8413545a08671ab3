"""What a transaction of `Database` means, the same on SQLite and on PostgreSQL: writers take
turns (a read-decide-write sees no other writer's change meanwhile), readers never wait."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from offload.core.errors import Unreachable
from offload.server.context import ServerContext
from offload.server.db.engine import Database
from offload.server.db.migrate import upgrade_database
from offload.server.db.models import Organization
from offload.server.services import accounts
from tests.support.postgres import PostgresCluster

BOUND_S = 30.0


def _orgs(ctx: ServerContext) -> Callable[[], int]:
    def count() -> int:
        with ctx.db.transaction(read_only=True) as db:
            return db.scalar(select(func.count()).select_from(Organization)) or 0

    return count


def test_a_reader_never_waits_for_a_writer_and_sees_only_what_was_committed(
    ctx: ServerContext,
):
    count = _orgs(ctx)
    with ctx.db.transaction() as writer:
        accounts.get_or_create_org(writer, "pending", ctx.now())
        writer.flush()
        assert count() == 0  # the writer holds its turn; a reader goes on, without its row
    assert count() == 1


def test_a_writer_waits_for_the_one_before_and_then_sees_its_rows(ctx: ServerContext):
    seen: list[int] = []
    entered = threading.Event()

    def second_writer() -> None:
        entered.set()
        with ctx.db.transaction() as db:  # waits here for the first writer's turn to end
            seen.append(db.scalar(select(func.count()).select_from(Organization)) or 0)
            accounts.get_or_create_org(db, "second", ctx.now())

    with ctx.db.transaction() as first:
        accounts.get_or_create_org(first, "first", ctx.now())
        first.flush()
        thread = threading.Thread(target=second_writer)
        thread.start()
        assert entered.wait(BOUND_S)
        thread.join(0.5)
        assert thread.is_alive() and seen == []  # still waiting for its turn
    thread.join(BOUND_S)
    assert seen == [1]  # it read after the first committed: the first's row included
    assert _orgs(ctx)() == 2


@pytest.mark.databases("postgresql", reason="SQLite does not enforce read-only transactions")
def test_a_read_only_transaction_refuses_writes(ctx: ServerContext):
    with pytest.raises(DBAPIError, match="read-only transaction"):
        with ctx.db.transaction(read_only=True) as db:
            accounts.get_or_create_org(db, "nope", ctx.now())
    assert _orgs(ctx)() == 0


def test_an_unusable_database_is_an_error_with_its_fix(postgres: PostgresCluster):
    url = postgres.url("no_such_database").replace("postgres@", "postgres:hunter2@")
    db = Database(url)
    try:
        with pytest.raises(Unreachable) as raised:
            upgrade_database(db)
    finally:
        db.dispose()
    message = str(raised.value)
    assert 'database "no_such_database" does not exist' in message
    assert "OFFLOAD_DATABASE_URL" in message
    assert "hunter2" not in message and "***" in message
