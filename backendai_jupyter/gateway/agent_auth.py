"""Who may connect as an agent: each agent proves its own id with its own key.

An agent makes a random key the first time it starts and keeps it in its state directory. The
first connection under a new id must also carry the cluster's join token; the gateway then
enrolls that id with (the hash of) the key presented. From then on the key alone opens a
connection under that id, and nothing else does: a holder of the join token can add an agent
of its own, but never speak for one that exists. ``backendai-jupyter admin agents reset ID``
forgets an enrollment (a host that lost its state directory then joins again).
"""

from __future__ import annotations

import hmac
import re
import time
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker

from ..common.errors import Conflict, NotFound, Unauthorized
from ..common.signing import token_hash
from .models import AgentKey
from .registry import AgentRegistry

AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_KEY_LENGTH = 32


def _same(a: str, b: str) -> bool:
    # compare_digest refuses non-ASCII str; compare bytes so any header is just "wrong".
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


class AgentAuthenticator:
    """Checks an agent's connection request against the enrolled keys."""

    def __init__(
        self,
        db: async_sessionmaker,
        join_token: str,
        registry: AgentRegistry,
        heartbeat_interval: float,
        allow_join: bool = True,
    ) -> None:
        self.db = db
        self.join_token = join_token
        self.registry = registry
        self.heartbeat_interval = heartbeat_interval
        self.allow_join = allow_join

    async def authenticate(self, agent_id: str, key: str, join_token: str) -> bool:
        """Return True when this connection enrolled the agent; raise when it may not connect."""
        if not AGENT_ID_RE.match(agent_id):
            raise Unauthorized(
                "an agent names itself in X-BackendAI-Agent: 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if len(key) < MIN_KEY_LENGTH:
            raise Unauthorized(f"the agent must present its own key of at least {MIN_KEY_LENGTH} characters")
        enrolled = False
        async with self.db() as db, db.begin():
            row = await db.get(AgentKey, agent_id)
            if row is not None:
                if not _same(row.key_hash, token_hash(key)):
                    raise Unauthorized(
                        f"agent {agent_id} is enrolled with another key. If this host lost its state "
                        f"directory, an admin can reset it: backendai-jupyter admin agents reset {agent_id}"
                    )
            elif self.allow_join and join_token and _same(join_token, self.join_token):
                db.add(AgentKey(agent_id=agent_id, key_hash=token_hash(key)))
                enrolled = True
            else:
                raise Unauthorized(
                    f"agent {agent_id} is not enrolled: start it once with the gateway's join token "
                    "(BACKENDAI_AGENT_TOKEN; the gateway writes it to DATA_DIR/agent-token)"
                )
        link = self.registry.get(agent_id)
        if link is not None and link.connected and self._recently_heard(link):
            raise Conflict(f"agent {agent_id} is already connected; a second connection is refused")
        return enrolled

    def _recently_heard(self, link: Any) -> bool:
        # A half-open connection (the host rebooted) sends no heartbeats: after two missed ones the
        # same agent may connect again, and the stale link is dropped when it registers.
        return time.monotonic() - link.last_heartbeat < 2 * self.heartbeat_interval + 1

    async def reset(self, agent_id: str) -> None:
        """Forget an agent's enrollment, so that it can join again with the join token."""
        async with self.db() as db, db.begin():
            row = await db.get(AgentKey, agent_id)
            if row is None:
                raise NotFound(f"agent {agent_id} is not enrolled")
            await db.delete(row)
