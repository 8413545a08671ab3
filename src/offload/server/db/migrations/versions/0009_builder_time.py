"""Builder time: stretches of an organisation's builder busy with a session's builds.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from offload.server.db.types import UtcDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(
            sa.Column("build_seconds_billed", sa.Float(), nullable=False, server_default="0")
        )
    op.create_table(
        "builder_intervals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("org_id", sa.String(32), nullable=False),
        sa.Column("instance_type", sa.String(32), nullable=False),
        sa.Column("start", UtcDateTime(), nullable=False),
        sa.Column("end", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name="fk_builder_intervals_session_id_sessions",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_builder_intervals_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_builder_intervals"),
    )
    op.create_index("ix_builder_intervals_org_start", "builder_intervals", ["org_id", "start"])
    op.create_index(
        "ix_builder_intervals_session_id", "builder_intervals", ["session_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_builder_intervals_session_id", table_name="builder_intervals")
    op.drop_index("ix_builder_intervals_org_start", table_name="builder_intervals")
    op.drop_table("builder_intervals")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("build_seconds_billed")
