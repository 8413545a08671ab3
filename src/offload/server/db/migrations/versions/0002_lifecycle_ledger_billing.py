"""Session lifecycle, usage ledger, organisation settings and billing.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-06
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from offload.server.db.types import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SESSION_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = (
    ("last_activity_at", UtcDateTime()),
    ("idle_since", UtcDateTime()),
    ("prompt_id", sa.String(32)),
    ("prompt_reason", sa.String(32)),
    ("prompt_asked_at", UtcDateTime()),
    ("prompt_expires_at", UtcDateTime()),
    ("last_long_prompt_at", UtcDateTime()),
)


def _org_fk() -> sa.ForeignKey:
    return sa.ForeignKey("organizations.id", ondelete="CASCADE")


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("idle_timeout_s", sa.Integer(), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        for name, type_ in _SESSION_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
        # Existing rows get the defaults the models give new ones.
        batch.add_column(sa.Column("images", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(
            sa.Column("containers_max", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column(
                "replacement_noticed", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
    with op.batch_alter_table("sessions") as batch:  # the models carry no server defaults
        for name in ("images", "containers_max", "replacement_noticed"):
            batch.alter_column(name, server_default=None)
    op.create_table(
        "org_settings",
        sa.Column("org_id", sa.String(32), _org_fk(), primary_key=True),
        sa.Column("offload_enabled", sa.Boolean(), nullable=False),
        sa.Column("idle_timeout_default_s", sa.Integer(), nullable=True),
        sa.Column("idle_timeout_locked", sa.Boolean(), nullable=False),
        sa.Column("fair_use_policy", sa.String(16), nullable=False),
    )
    op.create_table(
        "org_billing",
        sa.Column("org_id", sa.String(32), _org_fk(), primary_key=True),
        sa.Column("committed_minutes_per_month", sa.Integer(), nullable=True),
        sa.Column("on_demand_enabled", sa.Boolean(), nullable=False),
        sa.Column("on_demand_limit_cents", sa.Integer(), nullable=True),
        sa.Column("rates_cents_per_minute", sa.JSON(), nullable=False),
    )
    op.create_table(
        "trial_credits",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("org_id", sa.String(32), _org_fk(), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("granted_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_trial_credits_org_id", "trial_credits", ["org_id"])
    op.create_table(
        "ledger_intervals",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "session_id",
            sa.String(32),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("org_id", sa.String(32), _org_fk(), nullable=False),
        sa.Column("instance_type", sa.String(32), nullable=False),
        sa.Column("start", UtcDateTime(), nullable=False),
        sa.Column("end", UtcDateTime(), nullable=True),
    )
    op.create_index("ix_ledger_intervals_session_id", "ledger_intervals", ["session_id"])
    op.create_index("ix_ledger_intervals_user_start", "ledger_intervals", ["user_id", "start"])
    op.create_index("ix_ledger_intervals_org_start", "ledger_intervals", ["org_id", "start"])


def downgrade() -> None:
    for table in ("ledger_intervals", "trial_credits", "org_billing", "org_settings"):
        op.drop_table(table)
    with op.batch_alter_table("sessions") as batch:
        for name in [c[0] for c in _SESSION_COLUMNS] + [
            "images",
            "containers_max",
            "replacement_noticed",
        ]:
            batch.drop_column(name)
    with op.batch_alter_table("users") as batch:
        batch.drop_column("idle_timeout_s")
