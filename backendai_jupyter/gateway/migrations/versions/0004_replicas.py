"""Scale-out: the database holds everything the scheduler and the replicas need

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as t:
        t.add_column(sa.Column("devices", sa.JSON, nullable=False, server_default="[]"))
        t.add_column(sa.Column("device_stats", sa.JSON, nullable=False, server_default="[]"))
        t.add_column(sa.Column("replica_id", sa.String(64), nullable=True))
    with op.batch_alter_table("kernel_sessions") as t:
        t.add_column(sa.Column("prefer_agent", sa.String(64), nullable=True))
        t.add_column(sa.Column("reuse", sa.JSON, nullable=True))
        t.add_column(sa.Column("watched_at", sa.DateTime(timezone=True), nullable=True))
        t.add_column(sa.Column("ahead", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_kernel_sessions_owner_state", "kernel_sessions", ["owner_id", "state"])
    op.create_table(
        "agent_orders",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("replica_id", sa.String(64), nullable=False, index=True),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agent_orders")
    op.drop_index("ix_kernel_sessions_owner_state", "kernel_sessions")
    with op.batch_alter_table("kernel_sessions") as t:
        for name in ("ahead", "watched_at", "reuse", "prefer_agent"):
            t.drop_column(name)
    with op.batch_alter_table("agents") as t:
        for name in ("replica_id", "device_stats", "devices"):
            t.drop_column(name)
