"""vfolders, their shares, invitations and resumable uploads; policies limit them; sessions mount them

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vfolders",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("name_key", sa.String(64), nullable=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("volume", sa.String(64), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger, nullable=False),
        sa.Column("usage_bytes", sa.BigInteger, nullable=False),
        sa.Column("usage_measured_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trashed_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("owner_id", "name_key", name="uq_vfolders_owner_name"),
    )
    op.create_index("ix_vfolders_owner_id", "vfolders", ["owner_id"])
    op.create_table(
        "vfolder_shares",
        sa.Column(
            "vfolder_id", sa.String(36), sa.ForeignKey("vfolders.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("permission", sa.String(2), nullable=False),
        sa.Column("alias", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "vfolder_invitations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "vfolder_id", sa.String(36), sa.ForeignKey("vfolders.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("inviter_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("invitee_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("permission", sa.String(2), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_vfolder_invitations_vfolder_id", "vfolder_invitations", ["vfolder_id"])
    op.create_index("ix_vfolder_invitations_invitee_id", "vfolder_invitations", ["invitee_id"])
    op.create_table(
        "vfolder_uploads",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "vfolder_id", sa.String(36), sa.ForeignKey("vfolders.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_vfolder_uploads_vfolder_id", "vfolder_uploads", ["vfolder_id"])
    with op.batch_alter_table("resource_policies") as batch:
        batch.add_column(sa.Column("max_vfolders", sa.Integer, nullable=True))
        batch.add_column(sa.Column("max_quota_bytes", sa.BigInteger, nullable=True))
    with op.batch_alter_table("kernel_sessions") as batch:
        batch.add_column(sa.Column("mounts", sa.JSON, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("working_dir", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("kernel_sessions") as batch:
        batch.drop_column("working_dir")
        batch.drop_column("mounts")
    with op.batch_alter_table("resource_policies") as batch:
        batch.drop_column("max_quota_bytes")
        batch.drop_column("max_vfolders")
    op.drop_table("vfolder_uploads")
    op.drop_table("vfolder_invitations")
    op.drop_table("vfolder_shares")
    op.drop_table("vfolders")
