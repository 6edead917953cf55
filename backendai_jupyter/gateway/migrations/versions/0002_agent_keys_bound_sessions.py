"""agents' own keys; sessions remember whether they are bound to a stream and their client's key

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_keys",
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("kernel_sessions") as batch:
        batch.add_column(sa.Column("bound", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("kernel_key", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("kernel_sessions") as batch:
        batch.drop_column("kernel_key")
        batch.drop_column("bound")
    op.drop_table("agent_keys")
