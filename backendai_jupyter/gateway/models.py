"""The gateway's tables (SQLAlchemy 2). Schema changes go through Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)  # sha256 hex
    policy: Mapped[str | None] = mapped_column(
        ForeignKey("resource_policies.name", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    keypairs: Mapped[list[Keypair]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ResourcePolicy(Base):
    """What a user may take: sessions at once, per session, in total, and which images."""

    __tablename__ = "resource_policies"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    max_sessions: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_session_resources: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    total_resources: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    allowed_images: Mapped[list[str]] = mapped_column(JSON, default=list)
    max_vfolders: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_quota_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # all vfolders together
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Keypair(Base):
    __tablename__ = "keypairs"

    access_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_key: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    user: Mapped[User] = relationship(back_populates="keypairs", lazy="joined")


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))  # ALIVE, LOST
    schedulable: Mapped[bool] = mapped_column(Boolean, default=True)  # False: drained
    capacity: Mapped[dict[str, Any]] = mapped_column(JSON)
    images: Mapped[list[Any]] = mapped_column(JSON, default=list)
    devices: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # wire form
    device_stats: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # The gateway replica holding the agent's connection; NULL while it is not connected.
    replica_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AgentKey(Base):
    """An enrolled agent's own credential: only this key opens a connection under its id."""

    __tablename__ = "agent_keys"

    agent_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the key the agent presented
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class KernelSession(Base):
    __tablename__ = "kernel_sessions"
    __table_args__ = (Index("ix_kernel_sessions_owner_state", "owner_id", "state"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    access_key: Mapped[str] = mapped_column(String(32))
    image: Mapped[str] = mapped_column(String(255))
    resources: Mapped[dict[str, Any]] = mapped_column(JSON)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # never returned by the API
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    agent_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    devices: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # plugin → {device id: amount}
    connection: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Ends when its client's event stream is gone (the launcher, the gateway's own Kernel Gateway
    # kernels); kept here so a restarted gateway still ends it when nobody comes back for it.
    bound: Mapped[bool] = mapped_column(Boolean, default=False)
    # The HMAC key the client chose (the launcher relays messages signed with its own key).
    kernel_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The vfolders mounted into the kernel (wire form) and its working directory in the container.
    mounts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    working_dir: Mapped[str] = mapped_column(Text, default="")
    # A restart: the agent of the session it replaces (preferred) and that kernel's ports and key.
    prefer_agent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reuse: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # A bound session: when a replica last saw its client's event stream open.
    watched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ahead: Mapped[int] = mapped_column(Integer, default=0)  # while waiting: requests before it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AgentOrder(Base):
    """An order for an agent connected to another replica, and that replica's answer."""

    __tablename__ = "agent_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    replica_id: Mapped[str] = mapped_column(String(64), index=True)  # the one holding the agent
    method: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[Any] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JupyterSession(Base):
    """A Kernel Gateway API session (``/api/sessions``: a notebook path and its kernel), of its
    creator, kept here so that every replica lists, reads, renames and deletes the same ones."""

    __tablename__ = "jupyter_sessions"

    session_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    name: Mapped[str | None] = mapped_column(Text, nullable=True)
    type: Mapped[str | None] = mapped_column(Text, nullable=True)
    kernel_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RequestNonce(Base):
    """A signed request's nonce some replica accepted, until the request's date goes stale."""

    __tablename__ = "request_nonces"

    access_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class SessionTransition(Base):
    __tablename__ = "session_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("kernel_sessions.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VFolder(Base):
    """A user's folder on a storage volume: mounted into kernels, served by the file API."""

    __tablename__ = "vfolders"
    __table_args__ = (UniqueConstraint("owner_id", "name_key", name="uq_vfolders_owner_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    # The name while the vfolder is in use, NULL in the trash: names are unique among a user's
    # live vfolders only, so a trashed one does not block its name.
    name_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    volume: Mapped[str] = mapped_column(String(64))
    quota_bytes: Mapped[int] = mapped_column(BigInteger)
    usage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    usage_measured_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="ready")  # ready, trash
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    trashed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    owner: Mapped[User] = relationship(lazy="joined")


class VFolderShare(Base):
    """A user other than the owner who may use a vfolder, read-only or read-write."""

    __tablename__ = "vfolder_shares"

    vfolder_id: Mapped[str] = mapped_column(ForeignKey("vfolders.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    permission: Mapped[str] = mapped_column(String(2))  # ro, rw
    # The name the invitee sees it under when they have their own vfolder of its name.
    alias: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VFolderInvitation(Base):
    """An owner's offer to share a vfolder; a share exists once the invitee accepts."""

    __tablename__ = "vfolder_invitations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    vfolder_id: Mapped[str] = mapped_column(ForeignKey("vfolders.id", ondelete="CASCADE"), index=True)
    inviter_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    invitee_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    permission: Mapped[str] = mapped_column(String(2))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending, accepted, rejected, canceled
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VFolderUpload(Base):
    """A resumable upload in progress: the bytes so far are in the volume's staging directory."""

    __tablename__ = "vfolder_uploads"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    vfolder_id: Mapped[str] = mapped_column(ForeignKey("vfolders.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
