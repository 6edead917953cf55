"""The vfolder service: who may use which folder, how, and how much of the volume it takes.

Everything about vfolders goes through here: the /v1 handlers call it, and the session path
asks it for the mounts of a new kernel (:meth:`VFolderService.resolve_mounts`), which is all the
session service ever learns about them. Every file operation opens the vfolder through
:class:`~.fs.VFolderFS`, which keeps each path inside it.

Permissions: the owner may do anything; a share is ``rw`` (read and write files) or ``ro``
(read files). Only the owner renames, deletes, restores, purges, invites or changes shares.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from ...common.errors import ApiError, Conflict, Forbidden, InvalidRequest, NotFound
from ...common.tasks import cancel_and_wait
from ...common.wire import KERNEL_HOME, Mount
from ..models import ResourcePolicy, User, VFolder, VFolderInvitation, VFolderShare, VFolderUpload
from .fs import Entry, QuotaExceeded, StagedFile, VFolderFS, create_root, human_bytes, split_path

log = logging.getLogger(__name__)

UPLOAD_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
STAGING = ".staging"
# Kernels cannot be stopped from writing past a quota on volumes without project quotas; the
# file API refuses writes once usage reaches the quota, and usage is re-measured this often.
QUOTA_ENFORCED_IN_KERNELS = False


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat()


@dataclass
class Access:
    """A vfolder as one user may use it."""

    row: VFolder
    permission: str  # owner, rw, ro
    name: str  # the name this user knows it by (a share's alias, else the vfolder's name)

    @property
    def writable(self) -> bool:
        return self.permission in ("owner", "rw") and self.row.status == "ready"

    @property
    def is_owner(self) -> bool:
        return self.permission == "owner"


class VFolderService:
    """vfolders: their rows, their directories on the volumes, their shares and their usage."""

    def __init__(
        self,
        db: async_sessionmaker,
        volumes: dict[str, str],
        default_volume: str,
        owner: tuple[int, int] | None,
        default_quota: int,
        mounts: Callable[[], Awaitable[dict[str, list[str]]]],
        usage_interval: float = 60.0,
        kernel_home: str = KERNEL_HOME,
    ) -> None:
        if default_volume not in volumes:
            raise ValueError(f"the default volume {default_volume!r} is not in the storage volumes")
        self.db = db
        self.volumes = {name: str(Path(path).resolve()) for name, path in volumes.items()}
        self.default_volume = default_volume
        self.owner = owner
        self.default_quota = default_quota
        self.mounts = mounts  # vfolder id → the live sessions that mount it
        self.usage_interval = usage_interval
        self.kernel_home = kernel_home
        self._user_locks: dict[str, asyncio.Lock] = {}
        self._reserved: dict[str, int] = {}  # vfolder → bytes being written through the API now
        self._busy_uploads: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        for name, path in self.volumes.items():
            await asyncio.to_thread(self._prepare_volume, name, Path(path))
        self._task = asyncio.ensure_future(self._usage_loop())

    def _prepare_volume(self, name: str, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o755)
            (path / STAGING).mkdir(exist_ok=True, mode=0o700)
        except OSError as e:
            raise ValueError(f"storage volume {name!r} at {path} cannot be used: {e.strerror}") from None

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    # -- paths -------------------------------------------------------------------------------------

    def _subpath(self, row: VFolder) -> str:
        return f"{row.owner_id}/{row.id}"

    def _dir(self, row: VFolder) -> Path:
        return Path(self.volumes[row.volume], row.owner_id, row.id)

    def _staging(self, row: VFolder) -> Path:
        return Path(self.volumes[row.volume], STAGING)

    def open_fs(self, row: VFolder) -> VFolderFS:
        if row.volume not in self.volumes:
            raise ApiError(
                f"vfolder {row.name!r} is on volume {row.volume!r}, which this gateway no longer has "
                "(Gateway.storage_volumes)",
                status=503,
            )
        try:
            return VFolderFS(self._dir(row), self._staging(row), self.owner)
        except FileNotFoundError:
            raise ApiError(
                f"the directory of vfolder {row.name!r} is missing from volume {row.volume!r}: is the "
                "volume mounted on the gateway?",
                status=503,
            ) from None

    # -- the model -----------------------------------------------------------------------------------

    def model(self, a: Access, *, shares: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        row = a.row
        d: dict[str, Any] = {
            "id": row.id,
            "name": a.name,
            "owner": row.owner.name,
            "permission": a.permission,
            "writable": a.writable,
            "volume": row.volume,
            "quota_bytes": row.quota_bytes,
            "usage_bytes": row.usage_bytes,
            "usage_measured_at": _iso(row.usage_measured_at),
            "quota_enforced_in_kernels": QUOTA_ENFORCED_IN_KERNELS,
            "status": row.status,
            "created_at": _iso(row.created_at),
            "mount_path": f"{self.kernel_home}/{a.name}",
        }
        if row.status == "trash":
            d["trashed_at"] = _iso(row.trashed_at)
        if shares is not None:
            d["shared_with"] = shares
        return d

    async def _accessible(self, user: User, *, trash: bool = False) -> list[Access]:
        async with self.db() as db:
            own = (
                await db.scalars(
                    select(VFolder)
                    .where(VFolder.owner_id == user.id, VFolder.status == ("trash" if trash else "ready"))
                    .order_by(VFolder.name)
                )
            ).all()
            out = [Access(r, "owner", r.name) for r in own]
            if not trash:
                shared = (
                    await db.execute(
                        select(VFolder, VFolderShare)
                        .join(VFolderShare, VFolderShare.vfolder_id == VFolder.id)
                        .where(VFolderShare.user_id == user.id, VFolder.status == "ready")
                        .order_by(VFolder.name)
                    )
                ).all()
                out += [Access(r, s.permission, s.alias or r.name) for r, s in shared]
        return out

    async def list(self, user: User, *, trash: bool = False) -> list[dict[str, Any]]:
        return [self.model(a) for a in await self._accessible(user, trash=trash)]

    async def access(
        self, user: User, vid: str, *, write: bool = False, owner: bool = False, trash: bool = False
    ) -> Access:
        """The vfolder as ``user`` may use it, or 404 when they may not see it at all.

        ``write``: refuse a read-only share (403); ``owner``: refuse anyone but the owner (403);
        ``trash``: find it in the trash too (only its owner does).
        """
        async with self.db() as db:
            row = await db.get(VFolder, vid)
            found: Access | None = None
            if row is not None and row.owner_id == user.id:
                found = Access(row, "owner", row.name)
            elif row is not None and row.status == "ready":
                share = await db.get(VFolderShare, (vid, user.id))
                if share is not None:
                    found = Access(row, share.permission, share.alias or row.name)
        if found is None or (found.row.status == "trash" and not trash):
            raise NotFound(f"no vfolder {vid}")
        if owner and not found.is_owner:
            raise Forbidden(
                f"only the owner of vfolder {found.name!r} ({found.row.owner.name}) may do this; "
                "it is shared with you"
            )
        if write and not found.writable:
            raise Forbidden(f"vfolder {found.name!r} is shared with you read-only")
        return found

    async def by_name(self, user: User, name: str) -> Access:
        for a in await self._accessible(user):
            if a.name == name:
                return a
        raise NotFound(f"you have no vfolder named {name!r}")

    # -- create, rename, trash, restore, purge ---------------------------------------------------

    async def _policy(self, user: User) -> ResourcePolicy | None:
        if not user.policy:
            return None
        async with self.db() as db:
            policy = await db.get(ResourcePolicy, user.policy)
        if policy is None:
            raise Forbidden(
                f"your resource policy {user.policy} no longer exists; ask an admin to assign one"
            )
        return policy

    async def _check_quota_policy(self, user: User, quota: int, *, replacing: str | None = None) -> None:
        policy = await self._policy(user)
        if policy is None or policy.max_quota_bytes is None:
            return
        async with self.db() as db:
            q = select(func.coalesce(func.sum(VFolder.quota_bytes), 0)).where(VFolder.owner_id == user.id)
            if replacing:
                q = q.where(VFolder.id != replacing)
            taken = int((await db.scalar(q)) or 0)
        if taken + quota > policy.max_quota_bytes:
            raise Forbidden(
                f"your vfolders' quotas may add up to {human_bytes(policy.max_quota_bytes)} (policy "
                f"{policy.name}); {human_bytes(taken)} is given to your other vfolders (the trash "
                f"counts), so this one can have at most {human_bytes(max(0, policy.max_quota_bytes - taken))}"
            )

    async def create(self, user: User, name: str, quota: int | None, volume: str | None) -> dict[str, Any]:
        """A new vfolder of ``user``'s: ``name`` is a valid one (see :mod:`.requests`)."""
        volume = volume or self.default_volume
        if volume not in self.volumes:
            raise InvalidRequest(
                f"no storage volume {volume!r}; there are: {', '.join(sorted(self.volumes))}"
            )
        quota = self.default_quota if quota is None else quota
        if quota <= 0:
            raise InvalidRequest("quota must be more than 0 bytes")
        async with self._user_locks.setdefault(user.id, asyncio.Lock()):
            policy = await self._policy(user)
            if policy is not None and policy.max_vfolders is not None:
                async with self.db() as db:
                    count = await db.scalar(select(func.count()).where(VFolder.owner_id == user.id))
                if (count or 0) >= policy.max_vfolders:
                    raise Forbidden(
                        f"you have {count} vfolders (the trash counts); policy {policy.name} allows "
                        f"{policy.max_vfolders}. Purge one from the trash, or ask for more"
                    )
            await self._check_quota_policy(user, quota)
            await self._check_name_free(user, name)
            row = VFolder(
                id=str(uuid.uuid4()),
                name=name,
                name_key=name,
                owner_id=user.id,
                volume=volume,
                quota_bytes=quota,
                usage_bytes=0,
                status="ready",
                created_at=datetime.now(UTC),
            )
            try:
                await asyncio.to_thread(create_root, self._dir(row), self.owner)
            except OSError as e:
                raise ApiError(
                    f"could not create the vfolder on volume {volume!r}: {e.strerror}", status=503
                ) from None
            try:
                async with self.db() as db, db.begin():
                    db.add(row)
            except IntegrityError:
                await asyncio.to_thread(_remove_tree, self._dir(row))
                raise Conflict(f"you already have a vfolder named {name!r}") from None
            row.owner = user
        return self.model(Access(row, "owner", name))

    async def _check_name_free(self, user: User, name: str, *, except_id: str | None = None) -> None:
        for a in await self._accessible(user):
            if a.name == name and a.row.id != except_id:
                whose = "" if a.is_owner else f" (shared with you by {a.row.owner.name})"
                raise Conflict(f"you already have a vfolder named {name!r}{whose}; pick another name")

    async def update(self, user: User, vid: str, name: str | None, quota: int | None) -> dict[str, Any]:
        """PATCH: rename (the owner), set the quota (the owner, within their policy); None: unchanged."""
        a = await self.access(user, vid, owner=True)
        row = a.row
        async with self._user_locks.setdefault(user.id, asyncio.Lock()):
            async with self.db() as db, db.begin():
                fresh = await db.get(VFolder, vid)
                if fresh is None:
                    raise NotFound(f"no vfolder {vid}")
                if quota is not None:
                    await self._check_quota_policy(user, quota, replacing=vid)
                    fresh.quota_bytes = quota
                if name is not None:
                    if name != fresh.name:
                        await self._check_name_free(user, name, except_id=vid)
                        # Invitees who have a vfolder of that name keep seeing this one under its
                        # old name: two of the same name could not both be mounted.
                        shares = (
                            await db.scalars(select(VFolderShare).where(VFolderShare.vfolder_id == vid))
                        ).all()
                        for share in shares:
                            if share.alias is None:
                                taken = await db.scalar(
                                    select(func.count()).where(
                                        VFolder.owner_id == share.user_id, VFolder.name_key == name
                                    )
                                )
                                if taken:
                                    share.alias = fresh.name
                        fresh.name = name
                        fresh.name_key = name
            row.name, row.quota_bytes = fresh.name, fresh.quota_bytes
        return self.model(Access(row, "owner", row.name))

    async def trash(self, user: User, vid: str, *, force: bool = False) -> dict[str, Any]:
        """Move to the trash: unusable and hidden, but restorable by its owner until purged.

        A vfolder mounted by running kernels is refused, naming them, unless ``force``: the
        kernels then keep their mount (the directory is not moved) until they end.
        """
        a = await self.access(user, vid, owner=True)
        mounted = (await self.mounts()).get(vid, [])
        if mounted and not force:
            raise Conflict(
                f"vfolder {a.name!r} is mounted by running kernel sessions {', '.join(sorted(mounted))}; "
                "end them first, or delete with force=1 (they keep it until they end)",
                sessions=sorted(mounted),
            )
        async with self.db() as db, db.begin():
            row = await db.get(VFolder, vid)
            assert row is not None
            row.status = "trash"
            row.name_key = None
            row.trashed_at = datetime.now(UTC)
            await db.execute(
                update(VFolderInvitation)
                .where(VFolderInvitation.vfolder_id == vid, VFolderInvitation.state == "pending")
                .values(state="canceled", updated_at=datetime.now(UTC))
            )
        a.row.status, a.row.trashed_at = "trash", row.trashed_at
        return self.model(a)

    async def restore(self, user: User, vid: str) -> dict[str, Any]:
        a = await self.access(user, vid, owner=True, trash=True)
        if a.row.status != "trash":
            raise Conflict(f"vfolder {a.name!r} is not in the trash")
        await self._check_name_free(user, a.row.name)
        try:
            async with self.db() as db, db.begin():
                row = await db.get(VFolder, vid)
                assert row is not None
                row.status = "ready"
                row.name_key = row.name
                row.trashed_at = None
        except IntegrityError:
            raise Conflict(
                f"you already have a vfolder named {a.row.name!r}; rename that one first"
            ) from None
        a.row.status, a.row.trashed_at = "ready", None
        return self.model(a)

    async def purge(self, user: User, vid: str) -> None:
        """Delete a trashed vfolder and its files for good."""
        a = await self.access(user, vid, owner=True, trash=True)
        if a.row.status != "trash":
            raise Conflict(f"vfolder {a.name!r} is not in the trash: delete it first, then purge it")
        mounted = (await self.mounts()).get(vid, [])
        if mounted:
            raise Conflict(
                f"vfolder {a.name!r} is still mounted by running kernel sessions "
                f"{', '.join(sorted(mounted))}; purge it once they end",
                sessions=sorted(mounted),
            )
        await asyncio.to_thread(_remove_tree, self._dir(a.row))
        async with self.db() as db, db.begin():
            await db.execute(delete(VFolder).where(VFolder.id == vid))

    # -- sharing -----------------------------------------------------------------------------------

    async def _user_named(self, name: object) -> User:
        if not isinstance(name, str) or not name:
            raise InvalidRequest("user is required: the name of the user to share with")
        async with self.db() as db:
            u = await db.scalar(select(User).where(User.name == name))
        if u is None or u.disabled:
            raise NotFound(f"no user {name!r}")
        return u

    async def invite(self, user: User, vid: str, invitee_name: str, permission: str) -> dict[str, Any]:
        a = await self.access(user, vid, owner=True)
        invitee = await self._user_named(invitee_name)
        if invitee.id == user.id:
            raise InvalidRequest("you own this vfolder already")
        async with self.db() as db, db.begin():
            if await db.get(VFolderShare, (vid, invitee.id)) is not None:
                raise Conflict(
                    f"{invitee.name} has vfolder {a.name!r} already; change their permission instead "
                    f"(PUT /v1/vfolders/{vid}/shares/{invitee.name})"
                )
            pending = await db.scalar(
                select(VFolderInvitation).where(
                    VFolderInvitation.vfolder_id == vid,
                    VFolderInvitation.invitee_id == invitee.id,
                    VFolderInvitation.state == "pending",
                )
            )
            if pending is not None:
                raise Conflict(f"{invitee.name} has a pending invitation to {a.name!r} already")
            now = datetime.now(UTC)
            inv = VFolderInvitation(
                id=str(uuid.uuid4()),
                vfolder_id=vid,
                inviter_id=user.id,
                invitee_id=invitee.id,
                permission=permission,
                state="pending",
                created_at=now,
                updated_at=now,
            )
            db.add(inv)
        return self._invitation_json(inv, a.row, user.name, invitee.name)

    @staticmethod
    def _invitation_json(inv: VFolderInvitation, row: VFolder, inviter: str, invitee: str) -> dict[str, Any]:
        return {
            "id": inv.id,
            "vfolder_id": row.id,
            "vfolder_name": row.name,
            "inviter": inviter,
            "invitee": invitee,
            "permission": inv.permission,
            "state": inv.state,
            "created_at": _iso(inv.created_at),
        }

    async def invitations(self, user: User) -> dict[str, Any]:
        """Pending invitations to the user, and those the user sent."""
        async with self.db() as db:
            rows = (
                await db.execute(
                    select(VFolderInvitation, VFolder)
                    .join(VFolder, VFolder.id == VFolderInvitation.vfolder_id)
                    .where(
                        VFolderInvitation.state == "pending",
                        or_(VFolderInvitation.invitee_id == user.id, VFolderInvitation.inviter_id == user.id),
                    )
                    .order_by(VFolderInvitation.created_at)
                )
            ).all()
            ids = {i.inviter_id for i, _ in rows} | {i.invitee_id for i, _ in rows}
            names = dict((await db.execute(select(User.id, User.name).where(User.id.in_(ids)))).all())
        received, sent = [], []
        for inv, row in rows:
            j = self._invitation_json(inv, row, names.get(inv.inviter_id, ""), names.get(inv.invitee_id, ""))
            (received if inv.invitee_id == user.id else sent).append(j)
        return {"received": received, "sent": sent}

    async def _invitation(self, iid: str) -> VFolderInvitation:
        async with self.db() as db:
            inv = await db.get(VFolderInvitation, iid)
        if inv is None or inv.state != "pending":
            raise NotFound(f"no pending invitation {iid}")
        return inv

    async def answer(self, user: User, iid: str, accept: bool, alias: str | None = None) -> dict[str, Any]:
        """The invitee accepts (a share appears, named ``alias`` for them if given) or rejects."""
        inv = await self._invitation(iid)
        if inv.invitee_id != user.id:
            raise NotFound(f"no pending invitation {iid}")
        if not accept:
            await self._set_invitation(iid, "rejected")
            return {"id": iid, "state": "rejected"}
        async with self.db() as db:
            row = await db.get(VFolder, inv.vfolder_id)
        if row is None or row.status != "ready":
            await self._set_invitation(iid, "canceled")
            raise NotFound("the vfolder of this invitation is gone")
        name = alias if alias is not None else row.name
        try:
            await self._check_name_free(user, name)
        except Conflict:
            raise Conflict(
                f"you already have a vfolder named {name!r}; accept with a name of your own for it, "
                'e.g. {"name": "' + f"{name}-{row.owner.name}" + '"}'
            ) from None
        async with self.db() as db, db.begin():
            db.add(
                VFolderShare(
                    vfolder_id=row.id,
                    user_id=user.id,
                    permission=inv.permission,
                    alias=name if name != row.name else None,
                    created_at=datetime.now(UTC),
                )
            )
            fresh = await db.get(VFolderInvitation, iid)
            if fresh is None or fresh.state != "pending":
                raise NotFound(f"no pending invitation {iid}")
            fresh.state = "accepted"
            fresh.updated_at = datetime.now(UTC)
        return self.model(Access(row, inv.permission, name))

    async def _set_invitation(self, iid: str, state: str) -> None:
        async with self.db() as db, db.begin():
            inv = await db.get(VFolderInvitation, iid)
            if inv is not None and inv.state == "pending":
                inv.state = state
                inv.updated_at = datetime.now(UTC)

    async def cancel_invitation(self, user: User, iid: str) -> None:
        inv = await self._invitation(iid)
        if inv.inviter_id != user.id:
            if inv.invitee_id == user.id:
                raise Forbidden("reject an invitation you received instead (POST .../reject)")
            raise NotFound(f"no pending invitation {iid}")
        await self._set_invitation(iid, "canceled")

    async def shares(self, user: User, vid: str) -> list[dict[str, Any]]:
        await self.access(user, vid, owner=True)
        async with self.db() as db:
            rows = (
                await db.execute(
                    select(VFolderShare, User.name)
                    .join(User, User.id == VFolderShare.user_id)
                    .where(VFolderShare.vfolder_id == vid)
                    .order_by(User.name)
                )
            ).all()
        return [
            {"user": name, "permission": s.permission, "created_at": _iso(s.created_at)} for s, name in rows
        ]

    async def set_share(self, user: User, vid: str, who: str, permission: str) -> dict[str, Any]:
        """The owner changes what an invitee may do."""
        await self.access(user, vid, owner=True)
        other = await self._user_named(who)
        async with self.db() as db, db.begin():
            share = await db.get(VFolderShare, (vid, other.id))
            if share is None:
                raise NotFound(f"vfolder {vid} is not shared with {who}; invite them first")
            share.permission = permission
        return {"user": other.name, "permission": permission}

    async def unshare(self, user: User, vid: str, who: str) -> None:
        """The owner revokes a share. Kernels already running keep their mount until they end."""
        await self.access(user, vid, owner=True)
        other = await self._user_named(who)
        await self._drop_share(vid, other.id, who)

    async def leave(self, user: User, vid: str) -> None:
        a = await self.access(user, vid)
        if a.is_owner:
            raise InvalidRequest("you own this vfolder: delete it instead of leaving it")
        await self._drop_share(vid, user.id, user.name)

    async def _drop_share(self, vid: str, user_id: str, who: str) -> None:
        async with self.db() as db, db.begin():
            share = await db.get(VFolderShare, (vid, user_id))
            if share is None:
                raise NotFound(f"vfolder {vid} is not shared with {who}")
            await db.delete(share)

    # -- usage and quota -------------------------------------------------------------------------------

    def _room(self, row: VFolder) -> int:
        """Bytes a write through the API may still add."""
        return row.quota_bytes - row.usage_bytes - self._reserved.get(row.id, 0)

    def _refuse_over(self, row: VFolder, name: str, needed: int) -> QuotaExceeded:
        return QuotaExceeded(row.quota_bytes, row.quota_bytes - self._room(row), needed)

    async def _add_usage(self, vid: str, delta: int) -> None:
        if delta:
            async with self.db() as db, db.begin():
                # Never below 0: a file a kernel wrote since the last measurement is not counted yet,
                # and deleting it through the API must not free room that was never taken.
                grown = VFolder.usage_bytes + delta
                await db.execute(
                    update(VFolder)
                    .where(VFolder.id == vid)
                    .values(usage_bytes=case((grown < 0, 0), else_=grown))
                )

    async def measure(self, vid: str) -> int:
        """Walk the vfolder and store what it really takes (kernels write without telling us)."""
        async with self.db() as db:
            row = await db.get(VFolder, vid)
        if row is None:
            raise NotFound(f"no vfolder {vid}")

        def walk() -> int:
            with self.open_fs(row) as fs:
                return fs.usage()

        used = await asyncio.to_thread(walk)
        async with self.db() as db, db.begin():
            await db.execute(
                update(VFolder)
                .where(VFolder.id == vid)
                .values(usage_bytes=used, usage_measured_at=datetime.now(UTC))
            )
        return used

    async def measure_mounted(self, vids: list[str]) -> None:
        for vid in vids:
            try:
                await self.measure(vid)
            except (ApiError, OSError) as e:
                log.warning("could not measure vfolder %s: %s", vid, e)

    async def _usage_loop(self) -> None:
        """Re-measure the vfolders kernels have mounted: what they write shows in the usage."""
        while True:
            await asyncio.sleep(self.usage_interval)
            try:
                await self.measure_mounted(sorted(await self.mounts()))
            except Exception:
                log.exception("measuring vfolder usage failed")

    # -- files ------------------------------------------------------------------------------------------

    async def _fs_call(self, a: Access, fn: Callable[[VFolderFS], Any]) -> Any:
        def run() -> Any:
            with self.open_fs(a.row) as fs:
                return fn(fs)

        return await asyncio.to_thread(run)

    async def listdir(self, user: User, vid: str, path: str) -> dict[str, Any]:
        a = await self.access(user, vid)
        entries: list[Entry] = await self._fs_call(a, lambda fs: fs.listdir(path))
        return {"path": "/".join(split_path(path)), "entries": [e.to_json() for e in entries]}

    async def stat(self, user: User, vid: str, path: str) -> dict[str, Any]:
        a = await self.access(user, vid)
        entry: Entry = await self._fs_call(a, lambda fs: fs.stat(path))
        return entry.to_json()

    async def open_read(self, user: User, vid: str, path: str) -> tuple[int, Entry]:
        """An open file descriptor (the caller closes it) and the file's entry."""
        a = await self.access(user, vid)
        result: tuple[int, Entry] = await self._fs_call(a, lambda fs: fs.open_read(path))
        return result

    async def mkdir(self, user: User, vid: str, path: str, *, parents: bool = False) -> dict[str, Any]:
        a = await self.access(user, vid, write=True)
        if self._room(a.row) < 0:
            raise self._refuse_over(a.row, a.name, 0)
        entry: Entry = await self._fs_call(a, lambda fs: fs.mkdir(path, parents=parents))
        return entry.to_json()

    async def move(self, user: User, vid: str, src: str, dst: str, *, overwrite: bool) -> dict[str, Any]:
        a = await self.access(user, vid, write=True)

        def run(fs: VFolderFS) -> tuple[Entry, int]:
            replaced = 0
            if overwrite:
                try:
                    old = fs.lstat(dst)
                    replaced = old.size if old.type == "file" else 0
                except NotFound:
                    pass
            return fs.move(src, dst, overwrite=overwrite), replaced

        entry, replaced = await self._fs_call(a, run)
        await self._add_usage(vid, -replaced)
        return entry.to_json()

    async def copy(self, user: User, vid: str, src: str, dst: str) -> dict[str, Any]:
        a = await self.access(user, vid, write=True)
        room = self._room(a.row)
        try:
            entry, added = await self._fs_call(a, lambda fs: fs.copy(src, dst, limit=max(0, room)))
        except QuotaExceeded:
            raise self._refuse_over(a.row, a.name, room + 1) from None
        await self._add_usage(vid, added)
        return entry.to_json()

    async def delete_path(self, user: User, vid: str, path: str, *, recursive: bool) -> None:
        a = await self.access(user, vid, write=True)
        freed = await self._fs_call(a, lambda fs: fs.delete(path, recursive=recursive))
        await self._add_usage(vid, -int(freed))

    # Streamed writes: the handler opens a sink before the body arrives, writes each chunk as it
    # comes, and commits once the body is in and its signature holds.

    async def open_writer(self, user: User, vid: str, path: str, size: int, *, exclusive: bool) -> WriteSink:
        """A sink for a whole file of ``size`` bytes at ``path`` (replaced atomically at commit)."""
        a = await self.access(user, vid, write=True)
        split_path(path)  # a bad path is refused before any byte is taken

        def prepare(fs: VFolderFS) -> tuple[int, StagedFile]:
            old = 0
            try:
                existing = fs.stat(path)
            except NotFound:
                existing = None
            if existing is not None:
                if exclusive:
                    raise Conflict(f"{path} exists already")
                if existing.type == "directory":
                    raise Conflict(f"{path} is a directory")
                old = existing.size
            room = self._room(a.row) + old
            if size > room:
                raise self._refuse_over(a.row, a.name, size - old)
            return old, fs.writer(path, limit=size)

        fs = await asyncio.to_thread(self.open_fs, a.row)
        try:
            old, staged = await asyncio.to_thread(prepare, fs)
        except BaseException:
            fs.close()
            raise
        self._reserved[vid] = self._reserved.get(vid, 0) + size
        return WriteSink(self, a, path, fs, staged, size, old, exclusive)

    async def start_upload(self, user: User, vid: str, path: str, size: int) -> dict[str, Any]:
        """A resumable upload: the client sends chunks at offsets until ``size`` bytes are in."""
        a = await self.access(user, vid, write=True)
        if not split_path(path):
            raise InvalidRequest("path is required: where in the vfolder the file goes")
        try:
            existing = await self._fs_call(a, lambda fs: fs.stat(path))
        except NotFound:
            existing = None
        if existing is not None and existing.type == "directory":
            raise Conflict(f"{path} is a directory")
        old = existing.size if existing is not None else 0
        async with self.db() as db:
            open_bytes = await db.scalar(
                select(func.coalesce(func.sum(VFolderUpload.size), 0)).where(VFolderUpload.vfolder_id == vid)
            )
        if size - old > self._room(a.row) - int(open_bytes or 0):
            raise self._refuse_over(a.row, a.name, size - old)
        uid = secrets.token_urlsafe(24)
        await self._fs_call(a, lambda fs: fs.staged(uid, create=True).close())
        async with self.db() as db, db.begin():
            db.add(
                VFolderUpload(
                    id=uid,
                    vfolder_id=vid,
                    user_id=user.id,
                    path=path,
                    size=size,
                    created_at=datetime.now(UTC),
                )
            )
        return {"upload_id": uid, "offset": 0, "size": size, "path": path, "done": False}

    async def _upload(self, user: User, vid: str, uid: str) -> tuple[Access, VFolderUpload]:
        a = await self.access(user, vid, write=True)
        async with self.db() as db:
            up = await db.get(VFolderUpload, uid) if UPLOAD_ID_RE.match(uid) else None
        if up is None or up.vfolder_id != vid or up.user_id != user.id:
            raise NotFound(f"no upload {uid} in this vfolder")
        return a, up

    async def upload_status(self, user: User, vid: str, uid: str) -> dict[str, Any]:
        a, up = await self._upload(user, vid, uid)
        offset = await self._fs_call(a, lambda fs: _staged_size(fs, uid))
        return {"upload_id": uid, "offset": offset, "size": up.size, "path": up.path, "done": False}

    async def abort_upload(self, user: User, vid: str, uid: str) -> None:
        a, up = await self._upload(user, vid, uid)
        if uid in self._busy_uploads:
            raise Conflict("a chunk of this upload is arriving now; abort after it")
        await self._fs_call(a, lambda fs: _abort_staged(fs, uid))
        async with self.db() as db, db.begin():
            await db.execute(delete(VFolderUpload).where(VFolderUpload.id == uid))

    async def open_chunk(self, user: User, vid: str, uid: str, offset: int | None, length: int) -> ChunkSink:
        """A sink for the chunk of an upload that starts at ``offset``."""
        a, up = await self._upload(user, vid, uid)
        if offset is None:
            raise InvalidRequest("Upload-Offset is required: the byte offset this chunk starts at")
        if uid in self._busy_uploads:
            raise Conflict("another chunk of this upload is arriving now: send chunks one at a time")

        def prepare(fs: VFolderFS) -> StagedFile:
            staged = fs.staged(uid, create=False)
            if staged.size != offset:
                size = staged.size
                staged.close()
                raise Conflict(
                    f"this upload has {size} bytes; send the chunk that starts there (Upload-Offset: {size})",
                    offset=size,
                )
            if offset + length > up.size:
                staged.close()
                raise InvalidRequest(
                    f"the upload was declared as {up.size} bytes; this chunk would make it {offset + length}"
                )
            staged.limit = up.size
            return staged

        fs = await asyncio.to_thread(self.open_fs, a.row)
        try:
            staged = await asyncio.to_thread(prepare, fs)
        except BaseException:
            fs.close()
            raise
        self._busy_uploads.add(uid)
        return ChunkSink(self, a, up, fs, staged, offset)


def _staged_size(fs: VFolderFS, uid: str) -> int:
    staged = fs.staged(uid, create=False)
    try:
        return staged.size
    finally:
        staged.close()


def _abort_staged(fs: VFolderFS, uid: str) -> None:
    try:
        fs.staged(uid, create=False).abort()
    except NotFound:
        pass


class WriteSink:
    """One file arriving through the API: written as it streams, put in place at commit.

    It holds the vfolder open (its directory handles) until it is committed or aborted.
    """

    def __init__(
        self,
        svc: VFolderService,
        a: Access,
        path: str,
        fs: VFolderFS,
        staged: StagedFile,
        size: int,
        old: int,
        exclusive: bool,
    ) -> None:
        self.svc, self.a, self.path, self.fs, self.staged = svc, a, path, fs, staged
        self.size, self.old, self.exclusive = size, old, exclusive
        self._open = True

    def write(self, data: bytes) -> None:
        self.staged.write(data)  # refuses past the declared size

    def _release(self) -> None:
        if self._open:
            self._open = False
            vid = self.a.row.id
            self.svc._reserved[vid] = self.svc._reserved.get(vid, 0) - self.size
            self.fs.close()

    def abort(self) -> None:
        if self._open:
            self.staged.abort()
            self._release()

    async def commit(self) -> dict[str, Any]:
        try:
            if self.staged.size != self.size:
                raise InvalidRequest(f"the body had {self.staged.size} bytes, not the {self.size} announced")
            entry = await asyncio.to_thread(self.staged.commit, self.path, overwrite=not self.exclusive)
        except BaseException:
            self.abort()
            raise
        self._release()
        await self.svc._add_usage(self.a.row.id, entry.size - self.old)
        return entry.to_json()


class ChunkSink:
    """One chunk of a resumable upload, appended as it streams; undone if it is refused."""

    def __init__(
        self,
        svc: VFolderService,
        a: Access,
        up: VFolderUpload,
        fs: VFolderFS,
        staged: StagedFile,
        offset: int,
    ) -> None:
        self.svc, self.a, self.up, self.fs, self.staged, self.offset = svc, a, up, fs, staged, offset
        self._open = True

    def write(self, data: bytes) -> None:
        self.staged.write(data)

    def _release(self) -> None:
        if self._open:
            self._open = False
            self.svc._busy_uploads.discard(self.up.id)
            self.staged.close()
            self.fs.close()

    def abort(self) -> None:
        """Undo this chunk: the upload goes on from where it was."""
        if self._open:
            self.staged.truncate(self.offset)
            self._release()

    async def commit(self) -> dict[str, Any]:
        offset = self.staged.size
        out: dict[str, Any] = {
            "upload_id": self.up.id,
            "offset": offset,
            "size": self.up.size,
            "path": self.up.path,
            "done": False,
        }
        if offset < self.up.size:
            self._release()
            return out

        def finish() -> tuple[Entry, int]:
            try:
                found = self.fs.lstat(self.up.path)
                old = found.size if found.type == "file" else 0
            except NotFound:
                old = 0
            return self.staged.commit(self.up.path, overwrite=True), old

        try:
            entry, old = await asyncio.to_thread(finish)
        except BaseException:
            self._release()  # the bytes stay staged: resending the last chunk commits them
            raise
        self._release()
        async with self.svc.db() as db, db.begin():
            await db.execute(delete(VFolderUpload).where(VFolderUpload.id == self.up.id))
        await self.svc._add_usage(self.a.row.id, entry.size - old)
        return {**out, "done": True, "entry": entry.to_json()}


def _remove_tree(path: Path) -> None:
    """Remove a vfolder's directory without following links out of it."""
    import shutil

    try:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        shutil.rmtree(path.name, dir_fd=parent)
    except FileNotFoundError:
        pass
    finally:
        os.close(parent)


# -- mounts --------------------------------------------------------------------------------------------


async def resolve_mounts(
    svc: VFolderService, user: User, specs: list[Any], working_dir: str
) -> tuple[list[Mount], str]:
    """The mounts and working directory of a new kernel, checked: placed only if all are allowed.

    ``specs`` name vfolders (by name or id, optionally ``{"name": ..., "mode": "ro"}``) and are
    refused when the user may not use one. ``working_dir`` is a path in the container; when it
    lies in one of the user's vfolders (``~/<name>/...``) that vfolder is mounted too and
    the kernel starts there; any other working directory is ignored (the image's own is used).
    """
    mounts: dict[str, Mount] = {}
    home = PurePosixPath(svc.kernel_home)

    def add(a: Access, mode: str) -> None:
        if a.name in mounts:
            if mounts[a.name].vfolder_id != a.row.id:
                raise InvalidRequest(f"two vfolders named {a.name!r} cannot both be mounted")
            if mode == "rw" and a.writable:
                mounts[a.name].mode = "rw"
            return
        mounts[a.name] = Mount(
            volume=a.row.volume,
            volume_path=svc.volumes[a.row.volume],
            subpath=svc._subpath(a.row),
            target=str(home / a.name),
            mode=mode if a.writable else "ro",
            vfolder_id=a.row.id,
            name=a.name,
        )

    for spec in specs:
        ref, mode = spec if isinstance(spec, tuple) else (spec, "rw")
        a = await _find(svc, user, ref)
        if mode == "rw" and not a.writable:
            mode = "ro"  # a read-only share mounts read-only, asked or not
        add(a, mode)
    cwd = ""
    if working_dir:
        rel = PurePosixPath(working_dir)
        if rel.is_absolute() and rel.is_relative_to(home) and rel != home and ".." not in rel.parts:
            name, *rest = rel.relative_to(home).parts
            try:
                a = await svc.by_name(user, name)
            except NotFound:
                a = None
            if a is not None:
                add(a, "rw")
                sub = "/".join(rest)
                cwd = str(home / name)
                if sub:
                    try:
                        entry = await svc._fs_call(a, lambda fs: fs.stat(sub))
                        if entry.type == "directory":
                            cwd = str(home / name / sub)
                    except ApiError:
                        pass  # gone, or not a folder: the vfolder's top instead
    return list(mounts.values()), cwd


async def _find(svc: VFolderService, user: User, ref: object) -> Access:
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest("each mount names a vfolder (its name or id)")
    try:
        uuid.UUID(ref)
    except ValueError:
        return await svc.by_name(user, ref)
    return await svc.access(user, ref)
