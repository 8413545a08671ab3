"""Schema: migrations build it from nothing, match the models, and survive restarts; on SQLite
and on PostgreSQL (every revision, the newest included, runs on both)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.core.errors import OffloadError
from offload.server.app import create_app
from offload.server.db.engine import Database
from offload.server.db.migrate import (
    alembic_config,
    current_revision,
    head_revision,
    upgrade_database,
)
from offload.server.db.models import Base
from offload.server.services import accounts
from offload.server.services.ca import CA_KEY_FILENAME

from .support import PASSWORD


@pytest.fixture
def empty_db(empty_database_url: str) -> Iterator[Database]:
    db = Database(empty_database_url)
    yield db
    db.dispose()


def test_upgrade_builds_the_schema_of_the_models(empty_db: Database):
    assert current_revision(empty_db) is None
    upgrade_database(empty_db)
    assert current_revision(empty_db) == head_revision()
    with empty_db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
        tables = set(inspect(connection).get_table_names())
        assert {"users", "organizations", "memberships", "sessions", "runners"} <= tables


@pytest.mark.databases("sqlite", reason="PRAGMAs: the connection settings of SQLite")
def test_sqlite_runs_with_wal_and_foreign_keys(empty_db: Database):
    upgrade_database(empty_db)
    with empty_db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_every_revision_downgrades_and_upgrades_again(empty_db: Database):
    config = alembic_config(empty_db.url)
    for step, target in ((command.upgrade, "head"), (command.downgrade, "base")):
        with empty_db.engine.connect() as connection:
            config.attributes["connection"] = connection
            step(config, target)
        assert current_revision(empty_db) == (head_revision() if target == "head" else None)
    with empty_db.engine.connect() as connection:
        assert inspect(connection).get_table_names() == ["alembic_version"]
    upgrade_database(empty_db)
    with empty_db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_upgrade_twice_is_a_no_op(empty_db: Database):
    upgrade_database(empty_db)
    upgrade_database(empty_db)
    assert current_revision(empty_db) == head_revision()


async def test_a_restart_keeps_data_and_the_ca_key(
    settings: ServerSettings, clock, make_user, database: str
):
    user = make_user()
    first_ca = create_app(settings, clock)
    ca_line = first_ca.state.context.ca.public_key_line()
    first_ca.state.context.db.dispose()

    restarted = create_app(settings, clock)  # migrations run again on the same database
    try:
        context = restarted.state.context
        assert context.ca.public_key_line() == ca_line
        answer = await accounts.login(
            context, s.LoginRequest(username=user.username, password=PASSWORD)
        )
        assert answer.user.id == user.id
    finally:
        restarted.state.context.db.dispose()
    secret_files = [CA_KEY_FILENAME]
    if database == "sqlite":  # the database file holds password and token hashes too
        secret_files += ["offload.db", "offload.db-wal"]
    for secret_file in secret_files:
        assert stat.S_IMODE(os.stat(settings.data_dir / secret_file).st_mode) == 0o600


def test_a_replica_with_another_session_ca_key_refuses_to_start(
    settings: ServerSettings, clock, tmp_path
) -> None:
    """Replicas share one database; one started with a CA key of its own would sign
    certificates runners refuse: it stops at start, naming the key file to copy."""
    first = create_app(settings, clock)
    shared = settings.resolved_database_url()
    other = settings.model_copy(
        update={"data_dir": tmp_path / "other-replica", "database_url": shared}
    )
    with pytest.raises(OffloadError) as refused:
        create_app(other, clock)
    assert "not the one of the other replicas" in refused.value.message
    assert str(other.data_dir / CA_KEY_FILENAME) in refused.value.fix
    # The same key (copied, as the fix says) starts.
    (other.data_dir / CA_KEY_FILENAME).write_bytes(
        (settings.data_dir / CA_KEY_FILENAME).read_bytes()
    )
    second = create_app(other, clock)
    assert second.state.context.ca.public_key_line() == first.state.context.ca.public_key_line()
    for app in (first, second):
        app.state.context.db.dispose()
