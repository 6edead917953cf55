"""Resource policies: what a user may start, checked against what they hold in the database.

The check and the insert of the new session happen under a lock per user: with PostgreSQL an
advisory lock of the transaction that checks and inserts (so it holds across replicas), with
SQLite an asyncio lock (one gateway). Concurrent requests therefore cannot all pass a limit,
wherever they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
from collections.abc import AsyncIterator
from decimal import Decimal

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ...common.errors import ApiError
from ...common.slots import ResourceSlot, format_amount, total
from ...common.states import SessionState
from ..models import KernelSession, ResourcePolicy, User
from ..scheduler import normalize_image
from .store import OPEN


class PolicyViolation(ApiError):
    status = 403
    type = "policy-violation"


def _unlimited(slots: ResourceSlot) -> dict[str, Decimal]:
    """Limits that never bind, for slots a policy leaves open."""
    return {k: Decimal("Infinity") for k in slots}


class Policies:
    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def checked(
        self, db: async_sessionmaker, user: User, image: str, resources: ResourceSlot
    ) -> AsyncIterator[AsyncSession]:
        """Check ``user``'s policy for a request, then yield a transaction to insert it in,
        holding the user's lock until it commits."""
        if db.kw["bind"].dialect.name == "postgresql":
            async with db() as session, session.begin():
                key = {"k": f"user:{user.id}"}
                await session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), key)
                await self.check(session, user, image, resources)
                yield session
            return
        # SQLite: one gateway, so an asyncio lock is the user's lock; the check reads in a
        # session of its own (a transaction that read first could not become the writer once
        # another writer had committed).
        async with self._locks.setdefault(user.id, asyncio.Lock()):
            async with db() as reader:
                await self.check(reader, user, image, resources)
            async with db() as session, session.begin():
                yield session

    async def check(self, db: AsyncSession, user: User, image: str, resources: ResourceSlot) -> None:
        """Refuse at once what the user's resource policy does not allow, naming the limit."""
        mine = (
            await db.execute(
                select(KernelSession.state, KernelSession.resources).where(
                    KernelSession.owner_id == user.id, KernelSession.state.in_(OPEN)
                )
            )
        ).all()
        pending = sum(1 for state, _ in mine if state == SessionState.PENDING.value)
        if pending >= self.max_pending:
            raise PolicyViolation(
                f"you have {pending} kernels waiting to start; at most {self.max_pending} may wait at once. "
                "End one, or wait for them to start",
                limit="max_pending",
            )
        if not user.policy:
            return
        policy = await db.get(ResourcePolicy, user.policy, populate_existing=True)
        if policy is None:
            # Fail closed: a policy that cannot be read limits everything.
            raise PolicyViolation(
                f"your resource policy {user.policy} no longer exists; ask an admin to assign one",
                limit="policy",
            )
        if policy.allowed_images and not any(
            fnmatch.fnmatchcase(normalize_image(image), normalize_image(p)) or fnmatch.fnmatchcase(image, p)
            for p in policy.allowed_images
        ):
            raise PolicyViolation(
                f"image {image} is not allowed by policy {policy.name} "
                f"(allowed: {', '.join(policy.allowed_images)})",
                limit="allowed_images",
            )
        if policy.max_sessions is not None and len(mine) >= policy.max_sessions:
            raise PolicyViolation(
                f"policy {policy.name} allows {policy.max_sessions} sessions at once; you have {len(mine)}",
                limit="max_sessions",
            )
        per_session = ResourceSlot.parse(policy.max_session_resources)
        over = resources.shortfall({**_unlimited(resources), **per_session})
        if over:
            slot = over[0]
            raise PolicyViolation(
                f"policy {policy.name} allows at most {format_amount(slot, per_session[slot])} {slot} "
                f"per session; requested {format_amount(slot, resources[slot])}",
                limit=f"max_session_resources.{slot}",
            )
        total_limit = ResourceSlot.parse(policy.total_resources)
        held = total(ResourceSlot.parse(r) for _, r in mine) + resources
        over = held.shortfall({**_unlimited(held), **total_limit})
        if over:
            slot = over[0]
            raise PolicyViolation(
                f"policy {policy.name} allows {format_amount(slot, total_limit[slot])} {slot} in total; "
                f"with this request you would hold {format_amount(slot, held[slot])}",
                limit=f"total_resources.{slot}",
            )
