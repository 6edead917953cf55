"""initial schema: policies, users, keypairs, agents, kernel sessions and their transitions

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "resource_policies",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("max_sessions", sa.Integer, nullable=True),
        sa.Column("max_session_resources", sa.JSON, nullable=False),
        sa.Column("total_resources", sa.JSON, nullable=False),
        sa.Column("allowed_images", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("is_admin", sa.Boolean, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=True, unique=True),
        sa.Column(
            "policy",
            sa.String(64),
            sa.ForeignKey("resource_policies.name", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "keypairs",
        sa.Column("access_key", sa.String(32), primary_key=True),
        sa.Column("secret_key", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_keypairs_user_id", "keypairs", ["user_id"])
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("schedulable", sa.Boolean, nullable=False),
        sa.Column("capacity", sa.JSON, nullable=False),
        sa.Column("images", sa.JSON, nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "kernel_sessions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("access_key", sa.String(32), nullable=False),
        sa.Column("image", sa.String(255), nullable=False),
        sa.Column("resources", sa.JSON, nullable=False),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=True),
        sa.Column("devices", sa.JSON, nullable=False),
        sa.Column("connection", sa.JSON, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_kernel_sessions_owner_id", "kernel_sessions", ["owner_id"])
    op.create_index("ix_kernel_sessions_state", "kernel_sessions", ["state"])
    op.create_index("ix_kernel_sessions_agent_id", "kernel_sessions", ["agent_id"])
    op.create_table(
        "session_transitions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "session_id",
            sa.String(36),
            sa.ForeignKey("kernel_sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_session_transitions_session_id", "session_transitions", ["session_id"])


def downgrade() -> None:
    op.drop_table("session_transitions")
    op.drop_table("kernel_sessions")
    op.drop_table("agents")
    op.drop_table("keypairs")
    op.drop_table("users")
    op.drop_table("resource_policies")
