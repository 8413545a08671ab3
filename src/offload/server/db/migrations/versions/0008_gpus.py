"""GPU sessions: the runners' GPUs, the claims that give one to a session, owners' GPU rules.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runners") as batch:
        batch.add_column(sa.Column("gpu_devices", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("gpu_uuid", sa.String(96), nullable=True))
        batch.add_column(sa.Column("gpu_model", sa.String(128), nullable=True))
    with op.batch_alter_table("org_settings") as batch:
        batch.add_column(
            sa.Column(
                "gpu_sessions_allowed", sa.Boolean(), nullable=False, server_default=sa.true()
            )
        )
        batch.add_column(sa.Column("gpu_session_limit", sa.Integer(), nullable=True))
    op.create_table(
        "gpu_claims",
        sa.Column("runner_id", sa.String(32), nullable=False),
        sa.Column("gpu_uuid", sa.String(96), nullable=False),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.ForeignKeyConstraint(
            ["runner_id"],
            ["runners.id"],
            name="fk_gpu_claims_runner_id_runners",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name="fk_gpu_claims_session_id_sessions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("runner_id", "gpu_uuid", name="pk_gpu_claims"),
        sa.UniqueConstraint("session_id", name="uq_gpu_claims_session_id"),
    )


def downgrade() -> None:
    op.drop_table("gpu_claims")
    with op.batch_alter_table("org_settings") as batch:
        batch.drop_column("gpu_session_limit")
        batch.drop_column("gpu_sessions_allowed")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("gpu_model")
        batch.drop_column("gpu_uuid")
    with op.batch_alter_table("runners") as batch:
        batch.drop_column("gpu_devices")
