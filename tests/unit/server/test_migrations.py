"""Schema: migrations build it from nothing, match the models, and survive restarts."""

from __future__ import annotations

import os
import stat

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.server.app import create_app
from offload.server.db.engine import Database
from offload.server.db.migrate import current_revision, head_revision, upgrade_database
from offload.server.db.models import Base
from offload.server.services import accounts
from offload.server.services.ca import CA_KEY_FILENAME

from .support import PASSWORD


@pytest.fixture
def empty_db(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'empty.db'}")
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
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_upgrade_twice_is_a_no_op(empty_db: Database):
    upgrade_database(empty_db)
    upgrade_database(empty_db)
    assert current_revision(empty_db) == head_revision()


async def test_a_restart_keeps_data_and_the_ca_key(settings: ServerSettings, clock, make_user):
    user = make_user()
    first_ca = create_app(settings, clock)
    ca_line = first_ca.state.context.ca.public_key_line()
    first_ca.state.context.db.dispose()

    restarted = create_app(settings, clock)  # migrations run again on the same file
    try:
        context = restarted.state.context
        assert context.ca.public_key_line() == ca_line
        answer = await accounts.login(
            context, s.LoginRequest(username=user.username, password=PASSWORD)
        )
        assert answer.user.id == user.id
    finally:
        restarted.state.context.db.dispose()
    for secret_file in (CA_KEY_FILENAME, "offload.db", "offload.db-wal"):
        assert stat.S_IMODE(os.stat(settings.data_dir / secret_file).st_mode) == 0o600
