"""Users and keypairs: who is calling, and the admin keypair made on first start."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..common.signing import new_keypair, new_token, token_hash
from .models import Keypair, User


class Authenticator:
    """Looks up keypairs, caching them so a signed request costs no database read."""

    def __init__(self, db: async_sessionmaker) -> None:
        self.db = db
        self._cache: dict[str, tuple[str, User]] = {}
        self._tokens: dict[str, User] = {}

    async def lookup(self, access_key: str) -> tuple[str, User] | None:
        if access_key in self._cache:
            return self._cache[access_key]
        async with self.db() as db:
            kp = await db.get(Keypair, access_key)
            if kp is None:
                return None
            found = (kp.secret_key, kp.user)
        self._cache[access_key] = found
        return found

    def forget(self) -> None:
        """Drop the cache (after users or keys change)."""
        self._cache.clear()
        self._tokens.clear()

    async def lookup_token(self, token: str) -> User | None:
        """The user an API token belongs to (tokens are stored hashed)."""
        digest = token_hash(token)
        if digest in self._tokens:
            return self._tokens[digest]
        async with self.db() as db:
            user = (await db.scalars(select(User).where(User.token_hash == digest))).first()
        if user is not None:
            self._tokens[digest] = user
        return user

    async def ensure_admin(self, name: str = "admin") -> tuple[str, str, str] | None:
        """Create the first admin, its keypair and token when there is no user yet."""
        async with self.db() as db, db.begin():
            if (await db.scalars(select(User).limit(1))).first() is not None:
                return None
            token = new_token()
            user = User(
                id=str(uuid.uuid4()), name=name, is_admin=True, disabled=False, token_hash=token_hash(token)
            )
            access, secret = new_keypair()
            db.add(user)
            db.add(Keypair(access_key=access, secret_key=secret, user_id=user.id))
        return access, secret, token
