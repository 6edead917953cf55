"""/v1/admin: users and resource policies (admins only)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from ...common.errors import Conflict, Forbidden, InvalidRequest, NotFound
from ...common.signing import new_keypair, new_token, token_hash
from ..models import Keypair, ResourcePolicy, User
from ..requests import NAME_RE, NAME_RULE, PolicySpec, UserCreate, UserPatch
from .base import ApiHandler


class AdminHandler(ApiHandler):
    def authorize(self) -> None:
        if not self.current_user.is_admin:
            raise Forbidden("only admins may do this")

    @property
    def db(self) -> Any:
        return self.sessions.db


def user_json(u: User) -> dict[str, Any]:
    return {"id": u.id, "name": u.name, "is_admin": u.is_admin, "disabled": u.disabled, "policy": u.policy}


def policy_json(p: ResourcePolicy) -> dict[str, Any]:
    return {
        "name": p.name,
        "max_sessions": p.max_sessions,
        "max_session_resources": p.max_session_resources,
        "total_resources": p.total_resources,
        "allowed_images": p.allowed_images,
        "max_vfolders": p.max_vfolders,
        "max_quota_bytes": p.max_quota_bytes,
    }


class UsersHandler(AdminHandler):
    async def get(self) -> None:
        async with self.db() as db:
            users = (await db.scalars(select(User).order_by(User.name))).all()
        self.write_json({"users": [user_json(u) for u in users]})

    async def post(self) -> None:
        req = self.body_as(UserCreate)
        name, policy = req.name, req.policy
        async with self.db() as db, db.begin():
            if (await db.scalars(select(User).where(User.name == name))).first():
                raise Conflict(f"user {name} exists")
            if policy is not None and await db.get(ResourcePolicy, policy) is None:
                raise InvalidRequest(f"no resource policy {policy!r}")
            token = new_token()
            user = User(
                id=str(uuid.uuid4()),
                name=name,
                is_admin=req.is_admin,
                disabled=False,
                policy=policy,
                token_hash=token_hash(token),
            )
            access, secret = new_keypair()
            db.add(user)
            db.add(Keypair(access_key=access, secret_key=secret, user_id=user.id))
        self.write_json(
            {**user_json(user), "access_key": access, "secret_key": secret, "token": token}, status=201
        )


async def _user(db: Any, name: str) -> User:
    user = (await db.scalars(select(User).where(User.name == name))).first()
    if user is None:
        raise NotFound(f"no user {name}")
    return user


class UserHandler(AdminHandler):
    async def patch(self, name: str) -> None:
        req = self.body_as(UserPatch)
        async with self.db() as db, db.begin():
            user = await _user(db, name)
            if req.disabled is not None:
                user.disabled = req.disabled
            if req.given("policy"):
                if req.policy is not None and await db.get(ResourcePolicy, req.policy) is None:
                    raise InvalidRequest(f"no resource policy {req.policy!r}")
                user.policy = req.policy
        self.settings["authenticator"].forget()
        self.write_json(user_json(user))

    async def delete(self, name: str) -> None:
        async with self.db() as db, db.begin():
            user = await _user(db, name)
            if user.id == self.current_user.id:
                raise Conflict("you cannot delete yourself")
            if await self.sessions.has_open_sessions(user.id):
                raise Conflict(f"user {name} still has kernel sessions; end them first")
            # Sessions keep their owner; the credentials are gone for good: enabling the user again
            # gives back no token and no keypair (rotate-token and rotate-keypair issue new ones).
            user.disabled = True
            user.token_hash = None
            for kp in (await db.scalars(select(Keypair).where(Keypair.user_id == user.id))).all():
                await db.delete(kp)
        self.settings["authenticator"].forget()
        self.set_status(204)
        self.finish()


class UserTokenHandler(AdminHandler):
    """POST /v1/admin/users/{name}/token: a new API token; the old one stops working at once."""

    async def post(self, name: str) -> None:
        token = new_token()
        async with self.db() as db, db.begin():
            user = await _user(db, name)
            user.token_hash = token_hash(token)
        self.settings["authenticator"].forget()
        self.write_json({**user_json(user), "token": token}, status=201)


class UserKeypairHandler(AdminHandler):
    """POST /v1/admin/users/{name}/keypair: a new keypair; the old ones stop working at once."""

    async def post(self, name: str) -> None:
        access, secret = new_keypair()
        async with self.db() as db, db.begin():
            user = await _user(db, name)
            for kp in (await db.scalars(select(Keypair).where(Keypair.user_id == user.id))).all():
                await db.delete(kp)
            db.add(Keypair(access_key=access, secret_key=secret, user_id=user.id))
        self.settings["authenticator"].forget()
        self.write_json({**user_json(user), "access_key": access, "secret_key": secret}, status=201)


class PoliciesHandler(AdminHandler):
    async def get(self) -> None:
        async with self.db() as db:
            rows = (await db.scalars(select(ResourcePolicy).order_by(ResourcePolicy.name))).all()
        self.write_json({"policies": [policy_json(p) for p in rows]})


class PolicyHandler(AdminHandler):
    async def put(self, name: str) -> None:
        if not NAME_RE.match(name):
            raise InvalidRequest(f"policy name: {NAME_RULE}")
        spec = self.body_as(PolicySpec)
        async with self.db() as db, db.begin():
            policy = await db.get(ResourcePolicy, name)
            if policy is None:
                policy = ResourcePolicy(name=name)
                db.add(policy)
            policy.max_sessions = spec.max_sessions
            policy.max_session_resources = spec.max_session_resources.to_json()
            policy.total_resources = spec.total_resources.to_json()
            policy.allowed_images = spec.allowed_images
            policy.max_vfolders = spec.max_vfolders
            policy.max_quota_bytes = spec.max_quota_bytes
        self.write_json(policy_json(policy))

    async def delete(self, name: str) -> None:
        async with self.db() as db, db.begin():
            policy = await db.get(ResourcePolicy, name)
            if policy is None:
                raise NotFound(f"no resource policy {name}")
            users = (await db.scalars(select(User.name).where(User.policy == name))).all()
            if users:
                # Deleting it would leave these users with no limits at all.
                raise Conflict(
                    f"policy {name} is assigned to {', '.join(sorted(users))}; give them another policy "
                    "first (backendai-jupyter admin users set-policy NAME POLICY)"
                )
            await db.delete(policy)
        self.set_status(204)
        self.finish()
