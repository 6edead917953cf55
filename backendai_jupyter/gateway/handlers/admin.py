"""/v1/admin: users and resource policies (admins only)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from sqlalchemy import select

from ...common.errors import Conflict, Forbidden, InvalidRequest, NotFound
from ...common.signing import new_keypair, new_token, token_hash
from ...common.slots import ResourceSlot, SlotError
from ..models import Keypair, ResourcePolicy, User
from .base import ApiHandler

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AdminHandler(ApiHandler):
    async def prepare(self) -> None:
        await super().prepare()
        if not self._finished and not self.current_user.is_admin:
            self.send_api_error(Forbidden("only admins may do this"))

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
    }


class UsersHandler(AdminHandler):
    async def get(self) -> None:
        async with self.db() as db:
            users = (await db.scalars(select(User).order_by(User.name))).all()
        self.write_json({"users": [user_json(u) for u in users]})

    async def post(self) -> None:
        body = self.json_body()
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequest(
                "name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        policy = body.get("policy")
        async with self.db() as db, db.begin():
            if (await db.scalars(select(User).where(User.name == name))).first():
                raise Conflict(f"user {name} exists")
            if policy is not None and await db.get(ResourcePolicy, policy) is None:
                raise InvalidRequest(f"no resource policy {policy!r}")
            token = new_token()
            user = User(
                id=str(uuid.uuid4()),
                name=name,
                is_admin=bool(body.get("is_admin")),
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
        body = self.json_body()
        async with self.db() as db, db.begin():
            user = await _user(db, name)
            if "disabled" in body:
                user.disabled = bool(body["disabled"])
            if "policy" in body:
                if body["policy"] is not None and await db.get(ResourcePolicy, body["policy"]) is None:
                    raise InvalidRequest(f"no resource policy {body['policy']!r}")
                user.policy = body["policy"]
        self.settings["authenticator"].forget()
        self.write_json(user_json(user))

    async def delete(self, name: str) -> None:
        async with self.db() as db, db.begin():
            user = await _user(db, name)
            if user.id == self.current_user.id:
                raise Conflict("you cannot delete yourself")
            if any(s.owner_id == user.id for s in self.sessions.live.values()):
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
            raise InvalidRequest("policy name: 1-64 letters, digits, '.', '_' or '-'")
        body = self.json_body()
        max_sessions = body.get("max_sessions")
        if max_sessions is not None and (not isinstance(max_sessions, int) or max_sessions < 0):
            raise InvalidRequest("max_sessions must be a whole number >= 0 (or null for no limit)")
        try:
            per_session = ResourceSlot.parse(body.get("max_session_resources") or {}).to_json()
            total = ResourceSlot.parse(body.get("total_resources") or {}).to_json()
        except SlotError as e:
            raise InvalidRequest(str(e)) from None
        images = body.get("allowed_images") or []
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise InvalidRequest("allowed_images must be a list of image names or patterns")
        async with self.db() as db, db.begin():
            policy = await db.get(ResourcePolicy, name)
            if policy is None:
                policy = ResourcePolicy(name=name)
                db.add(policy)
            policy.max_sessions = max_sessions
            policy.max_session_resources = per_session
            policy.total_resources = total
            policy.allowed_images = images
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
