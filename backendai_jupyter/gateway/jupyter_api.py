"""The Jupyter Kernel Gateway API (``/api/...``), built on jupyter_server's own machinery.

``jupyter lab --gateway-url``, VS Code's "existing Jupyter server" and any Kernel Gateway client
talk to these handlers. They are jupyter_server's kernel, kernelspec, session and websocket
handlers and managers, not a second relay; only four things are ours:

- who the caller is: their own token (``Authorization: token ...`` or ``?token=``), never a
  ``KERNEL_USERNAME`` from the request body;
- what they may see: each kernel has an owner, and a user lists, connects to, interrupts,
  restarts and deletes only their own (an admin sees all); others' kernels are 404;
- where kernels run: through our provisioner, i.e. the same sessions, scheduler and agents as
  every other path, its requests answered by the session service in process, as the owner;
- where they are known: in the database, so that with several gateway replicas any of them
  serves any kernel (adopted from its session row) and any ``/api/sessions`` entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_server.auth.identity import IdentityProvider
from jupyter_server.auth.identity import User as JupyterUser
from jupyter_server.services.kernels.handlers import KernelActionHandler, KernelHandler, MainKernelHandler
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager, ServerKernelManager
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from jupyter_server.services.sessions.handlers import SessionHandler, SessionRootHandler
from jupyter_server.services.sessions.sessionmanager import SessionManager
from sqlalchemy import delete, select, update
from tornado import web
from traitlets import Set, Unicode, default

from ..common.errors import ApiError, LaunchError, LaunchTimeout
from ..common.imagespecs import SPEC_PREFIX, image_kernel, kernelspec_json, one_per_repository, repository_of
from ..common.states import SessionState
from ..provisioner.provisioner import running_or_over
from .models import JupyterSession, Keypair, User
from .requests import SessionRequest, validate_env
from .scheduler import normalize_image
from .service_client import ServiceClient
from .vfolders.service import resolve_mounts

# Kernel Gateway API kernels are sessions named "kernel-gateway:<kernel id>": any replica finds
# them there (see BackendAIMappingKernelManager.adopt).
API_PREFIX = "kernel-gateway"

# The user of the request being served (set once the token is checked).
_caller: contextvars.ContextVar[User | None] = contextvars.ContextVar("backendai_caller", default=None)


class TokenIdentityProvider(IdentityProvider):
    """Each user is whoever their own API token says."""

    @default("token")
    def _token_default(self) -> str:
        return ""  # no shared server token: every user has their own

    @property
    def auth_enabled(self) -> bool:
        return True

    async def get_user(self, handler: web.RequestHandler) -> JupyterUser | None:  # type: ignore[override]
        header = handler.request.headers.get("Authorization", "")
        token = (
            header[6:].strip()
            if header.lower().startswith("token ")
            else handler.get_query_argument("token", "")
        )
        if not token:
            return None
        user = await handler.settings["authenticator"].lookup_token(token)
        if user is None or user.disabled:
            return None
        _caller.set(user)
        return JupyterUser(username=user.name, name=user.name, display_name=user.name)


def caller() -> User:
    user = _caller.get()
    if user is None:
        raise web.HTTPError(403, "no authenticated user")
    return user


class BackendAIKernelManager(ServerKernelManager):
    """One kernel, provisioned through our provisioner as its owner (see :mod:`.service_client`)."""

    async def _async_pre_start_kernel(self, **kw: Any) -> Any:
        client = kw.pop("owner_client", None)
        if self.provisioner is None and client is not None:
            self.kernel_id = self.kernel_id or kw.pop("kernel_id", None) or str(uuid.uuid4())
            self.provision_as(client)
            # One launch timeout: the client's. jupyter_server's GatewayClient always sends it and
            # waits that long plus a pad, so the client gets our clear error, not its own timeout.
            timeout = (kw.get("env") or {}).get("KERNEL_LAUNCH_TIMEOUT", "")
            try:
                seconds = float(timeout) if timeout.isascii() else 0.0
            except ValueError:
                seconds = 0.0
            if 0 < seconds < float("inf"):
                self.provisioner.launch_timeout = seconds
        return await super()._async_pre_start_kernel(**kw)

    def provision_as(self, client: ServiceClient) -> None:
        """Give this kernel our provisioner, its requests answered in process as ``client``'s owner."""
        self.provisioner = KernelProvisionerFactory.instance(parent=self.parent).create_provisioner_instance(
            self.kernel_id, self.kernel_spec, parent=self
        )
        self.provisioner._client = client
        self.provisioner.session_prefix = API_PREFIX
        # Only the gateway's processes can reach the kernel (jupyter_server's kernel manager lives
        # here): when they are gone for good, so is the kernel, also after a gateway restart.
        self.provisioner.bind_to_stream = True
        # The env reaching here was filtered by the mapping manager; name the same patterns
        # again so nothing else can pass even where a caller gave no env at all.
        self.provisioner.forward_env = ["KERNEL_*", *sorted(self.parent.env_allowlist)]


class BackendAIMappingKernelManager(AsyncMappingKernelManager):
    """jupyter_server's kernel manager, with an owner for every kernel.

    Its kernels are the database's: with several gateway replicas, a kernel started through one
    is *adopted* by another the first time a client names it there (or lists kernels there):
    the replica builds a kernel manager for the running session, as jupyter_client does for
    external connection files, and from then on serves its websocket, interrupts, restarts and
    deletion like its own. An end that comes from elsewhere (another replica, ``/v1``, an admin)
    makes every replica forget the kernel, instead of restarting it as if it had died.
    """

    env_allowlist = Set(
        Unicode(),
        help="Variables a client may pass to kernels besides KERNEL_* (Gateway.kernel_env_allowlist).",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_manager_class = "backendai_jupyter.gateway.jupyter_api.BackendAIKernelManager"
        self.owners: dict[str, str] = {}
        self.adopted: set[str] = set()  # kernels another replica started
        self._adopting: dict[str, asyncio.Task[None]] = {}
        # Set by the gateway: its async sessionmaker, session and vfolder services, resource rules.
        self.db: Any = None
        self.sessions: Any = None
        self.vfolders: Any = None
        self.resource_rules: Any = None

    async def _owner_client(self, user: User) -> ServiceClient:
        """The provisioner's client: the session service, acting as ``user``."""
        async with self.db() as db:
            access_key = await db.scalar(
                select(Keypair.access_key).where(Keypair.user_id == user.id).limit(1)
            )
        if access_key is None:
            raise web.HTTPError(403, f"user {user.name} has no keypair")
        return ServiceClient(self.sessions, self.vfolders, self.resource_rules, user, access_key)

    def client_env(self, env: dict[str, str] | None) -> dict[str, str]:
        """What of ``env`` may reach a kernel: ``KERNEL_*`` and the operator's allowlist.

        jupyter_server hands the gateway's own environment to kernels it starts for sessions
        (``SessionManager.get_kernel_env``); here that would carry the gateway's secrets into
        every user's kernel. Only what a client may send passes, on every route.
        """
        return {k: v for k, v in (env or {}).items() if k.startswith("KERNEL_") or k in self.env_allowlist}

    def update_env(self, *, kernel_id: str, env: dict[str, str]) -> None:
        super().update_env(kernel_id=kernel_id, env=self.client_env(env))

    def visible(self, kernel_id: str) -> bool:
        """Whether the caller may see this kernel (its owner, or an admin)."""
        user = _caller.get()
        return user is not None and (user.is_admin or self.owners.get(kernel_id) == user.id)

    async def start_kernel(
        self, *, kernel_id: str | None = None, path: str | None = None, **kwargs: Any
    ) -> str:
        user = caller()
        kwargs["env"] = self.client_env(kwargs.get("env"))
        if kernel_id is not None and kernel_id in self:  # a session reusing a kernel: the owner's only
            self._check_kernel_id(kernel_id)
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        client = kwargs["owner_client"] = await self._owner_client(user)
        # The owner is known before the kernel exists: starting it already looks it up.
        kid = kernel_id or str(uuid.uuid4())
        client.on_event = functools.partial(self._session_changed, kid)
        self.owners[kid] = user.id
        try:
            kid = await super().start_kernel(kernel_id=kid, path=path, **kwargs)
        except BaseException:
            self.owners.pop(kid, None)
            raise
        # Answer once the kernel's session is in the database (or its start failed): the client's
        # next request may go to another replica, which finds the kernel there.
        ready = asyncio.ensure_future(self._kernels[kid].ready) if kid in self._kernels else None
        await asyncio.wait(
            [f for f in (client.created, ready) if f is not None],
            timeout=30,
            return_when=asyncio.FIRST_COMPLETED,
        )
        return kid

    def _check_kernel_id(self, kernel_id: str) -> None:
        super()._check_kernel_id(kernel_id)
        if _caller.get() is not None and not self.visible(kernel_id):
            raise web.HTTPError(404, f"Kernel does not exist: {kernel_id}")

    def list_kernels(self) -> list[dict[str, Any]]:
        kernels = super().list_kernels()
        if _caller.get() is None:
            return kernels
        return [k for k in kernels if self.visible(k["id"])]

    async def shutdown_kernel(self, kernel_id: str, now: bool = False, restart: bool = False) -> None:
        """End a kernel; answers once it is gone, also when it was still queued or starting."""
        self._check_kernel_id(kernel_id)
        km = self._kernels.get(kernel_id)
        if km is not None and not restart and not km.ready.done():
            # Still queued or starting: end its session, so the start fails now instead of
            # shutting down after it (which is what jupyter_client would wait for).
            if km.provisioner is not None:
                await km.provisioner.cancel_launch()
        await super().shutdown_kernel(kernel_id, now=now, restart=restart)
        pending = self._pending_kernels.get(kernel_id)
        if pending is not None and not restart:
            with contextlib.suppress(Exception):
                await pending  # with pending kernels the removal runs on: wait for it

    async def _finish_kernel_start(self, kernel_id: str) -> None:
        km = self._kernels[kernel_id]
        try:
            await km.ready
        except Exception as e:
            # Keep it listed, dead, with the reason: that is how a Kernel Gateway client learns it.
            km.execution_state = "dead"
            km.reason = str(e)
            return
        await super()._finish_kernel_start(kernel_id)

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        """jupyter_server's model, plus where the launch stands while the kernel starts."""
        model = super().kernel_model(kernel_id)
        provisioner = self._kernels[kernel_id].provisioner
        sid = getattr(provisioner, "session_id", None)
        if sid:
            event = provisioner.client.cached_state(sid)
            model["backendai"] = {
                "session_id": sid,
                "state": event.get("state"),
                "reason": event.get("reason"),
            }
        return model

    def remove_kernel(self, kernel_id: str) -> Any:
        self.owners.pop(kernel_id, None)
        self.adopted.discard(kernel_id)
        return super().remove_kernel(kernel_id)

    def release(self) -> None:
        """Close this process's sockets to its kernels and their ZMQ context (the kernels run on).

        Called when the gateway stops, on its own thread. Left to garbage collection, jupyter_client
        destroys the context in ``__del__``, on whatever thread collects it, where terminating a
        context whose sockets another thread uses blocks that thread for good.
        """
        for kid, km in list(self._kernels.items()):
            km.stop_restarter()
            with contextlib.suppress(Exception):
                self.stop_watching_activity(kid)
        if self._created_context and not self.context.closed:
            self.context.destroy(linger=0)

    # -- kernels of other replicas ---------------------------------------------------------------

    async def adopt(self, kernel_id: str) -> None:
        """Know ``kernel_id`` here if the caller may see it and another replica started it."""
        user = _caller.get()
        if user is None or kernel_id in self:
            return
        owner = None if user.is_admin else user.id
        for row in await self.sessions.named_open(API_PREFIX, name=kernel_id, owner=owner):
            await self._adopt(row)

    async def adopt_all(self) -> None:
        """Know here every kernel the caller may see, wherever it was started."""
        user = _caller.get()
        if user is None:
            return
        for row in await self.sessions.named_open(API_PREFIX, owner=None if user.is_admin else user.id):
            await self._adopt(row)

    async def _adopt(self, row: Any) -> None:
        kid = row.name.split(":", 1)[1]
        if kid in self or kid in self._pending_kernels:
            return
        task = self._adopting.get(kid)
        if task is None:
            task = self._adopting[kid] = asyncio.ensure_future(self._take(kid, row))
            task.add_done_callback(lambda _: self._adopting.pop(kid, None))
        await asyncio.shield(task)

    async def _take(self, kid: str, row: Any) -> None:
        async with self.db() as db:
            owner = await db.get(User, row.owner_id)
        if owner is None or kid in self:
            return
        client = await self._owner_client(owner)
        client.on_event = functools.partial(self._session_changed, kid)
        km = self.kernel_manager_factory(
            connection_file=os.path.join(self.connection_dir, f"kernel-{kid}.json"),
            parent=self,
            log=self.log,
            kernel_name=self._kernelspec_of(row.image),
            kernel_spec_manager=self.kernel_spec_manager,
        )
        km.kernel_id = kid
        km.provision_as(client)
        km.provisioner.session_id = row.id
        client.watch(row.id)
        km.execution_state = "starting"
        km.reason = ""
        km.last_activity = datetime.now(UTC)
        self._kernels[kid] = km
        self._kernel_connections[kid] = 0
        self.owners[kid] = row.owner_id
        self.adopted.add(kid)
        self.log.info("kernel %s (session %s) adopted from another replica", kid, row.id)
        asyncio.ensure_future(self._adopted_ready(kid, km, row.id))

    async def _adopted_ready(self, kid: str, km: Any, sid: str) -> None:
        """Once the adopted kernel's session runs: its connection, and jupyter_server's tracking."""
        w = await km.provisioner.client.wait_for(sid, running_or_over)
        if w.state != SessionState.RUNNING:
            km.ready.set_exception(
                LaunchError(f"the kernel could not start: {w.event.get('reason') or w.event['state']}")
            )
        else:
            km.load_connection_info(km.provisioner.running(w.event))
            km.execution_state = "idle"
            km.ready.set_result(None)
        if self._kernels.get(kid) is km:
            await self._finish_kernel_start(kid)

    def _kernelspec_of(self, image: str) -> str:
        """The kernelspec a session's image was started from (the default kernel's if several)."""
        names = []
        for name in self.kernel_spec_manager.find_kernel_specs():
            with contextlib.suppress(Exception):
                config = self.kernel_spec_manager.get_kernel_spec(name).metadata["kernel_provisioner"][
                    "config"
                ]
                if normalize_image(config.get("image", "")) == image:
                    names.append(name)
        if self.default_kernel_name in names or not names:
            return self.default_kernel_name
        return sorted(names)[0]

    def _session_changed(self, kid: str, sid: str, event: dict[str, Any]) -> None:
        """An event of a kernel's session: forget the kernel when it was ended from elsewhere."""
        km = self._kernels.get(kid)
        provisioner = getattr(km, "provisioner", None)
        if provisioner is None or provisioner.session_id != sid or provisioner.ended_here(sid):
            return
        state = SessionState(event["state"])
        # Ended on request (TERMINATING) elsewhere; an adopted kernel also when it just died: the
        # replica that started it restarts it (a new session the next request adopts).
        if state == SessionState.TERMINATING or (kid in self.adopted and state.is_terminal):
            self.log.info("kernel %s ended elsewhere (%s): forgotten here", kid, event.get("reason") or state)
            km.stop_restarter()
            with contextlib.suppress(Exception):
                self.stop_watching_activity(kid)
            self._kernel_connections.pop(kid, None)
            self._kernel_ports.pop(kid, None)
            provisioner.client.forget(sid)
            self.remove_kernel(kid)

    async def restart_adopted(self, kernel_id: str) -> None:
        """Restart an adopted kernel in place (same ports and key), through the session service."""
        provisioner = self._kernels[kernel_id].provisioner
        try:
            await self.sessions.restart(provisioner.client.owner, provisioner.session_id)
        except ApiError as e:
            raise web.HTTPError(e.status, e.title) from None

    def cwd_for_path(self, path: str, **kwargs: Any) -> str:
        # Paths name places in the user's storage, not on the gateway host.
        return ""


class GatewayKernelSpecManager(KernelSpecManager):
    """The kernelspecs the gateway offers: installed ``backendai-*`` presets, and one per image.

    Every kernel image the agents have describes its kernel in its labels (language, display
    name, interrupt mode, resources, logo: see :mod:`~backendai_jupyter.common.imagespecs`); an
    image repository no preset starts gets a kernelspec ``backendai-<name>`` of its own, with the
    image's resources over the gateway's defaults. Content-hash tags never make cards of their
    own. Nothing else is offered: a kernelspec that would start a kernel on the gateway host
    itself never shows.
    """

    sessions: Any = None  # the gateway's SessionService, set once it exists
    # Where image kernelspecs without logos point: an empty directory of their own. An empty
    # resource_dir would make jupyter_server serve /kernelspecs/<name>/<file> from the
    # gateway's working directory.
    empty_resource_dir: str = ""
    # Where image kernelspecs with logos keep them: a directory per kernelspec under it.
    logo_root: str = ""

    def _presets(self) -> dict[str, str]:
        return {n: d for n, d in super().find_kernel_specs().items() if n.startswith(SPEC_PREFIX)}

    def _image_specs(self) -> dict[str, KernelSpec]:
        if self.sessions is None:
            return {}
        presets = self._presets()
        # An image a preset already starts gets no second card.
        covered = set()
        for name in presets:
            config = super().get_kernel_spec(name).metadata.get("kernel_provisioner", {}).get("config", {})
            if isinstance(config.get("image"), str):
                covered.add(repository_of(normalize_image(config["image"])))
        kernels = [
            k
            for image in self.sessions.agents.connected_images()
            if (k := image_kernel(image.tags, image.kernel, image.logo)) is not None
        ]
        out: dict[str, KernelSpec] = {}
        defaults = self.sessions.default_resources.to_json()
        for name, k in one_per_repository(kernels).items():
            if name in presets or repository_of(normalize_image(k.image)) in covered:
                continue
            argv = [sys.executable, "-m", "backendai_jupyter.provisioner.launcher", "-f", "{connection_file}"]
            spec = kernelspec_json(k, [*argv, "--kernel", name], {**defaults, **k.resources})
            out[name] = KernelSpec(resource_dir=self._resources_of(name, k.logo), **spec)
        return out

    def _resources_of(self, name: str, logo: bytes) -> str:
        """A kernelspec's resource directory: its logo alone, or the empty directory."""
        if not logo or not self.logo_root:
            return self.empty_resource_dir
        d = Path(self.logo_root) / name
        path = d / "logo-64x64.png"
        if not path.is_file() or path.read_bytes() != logo:
            d.mkdir(parents=True, exist_ok=True, mode=0o755)
            tmp = d / ".logo.tmp"
            tmp.write_bytes(logo)
            tmp.replace(path)
        return str(d)

    def find_kernel_specs(self) -> dict[str, str]:
        found = self._presets()
        found.update({n: s.resource_dir for n, s in self._image_specs().items()})
        return found

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        images = self._image_specs()
        if kernel_name in images:
            spec = images[kernel_name]
        elif kernel_name.startswith("backendai-"):
            spec = super().get_kernel_spec(kernel_name)
        else:
            raise NoSuchKernel(kernel_name)
        if not spec.resource_dir or not Path(spec.resource_dir).is_dir():
            raise NoSuchKernel(kernel_name)  # never serve files from wherever "" would point
        return spec


SESSION_COLUMNS = frozenset({"session_id", "path", "name", "type", "kernel_id"})


class OwnedSessionManager(SessionManager):
    """jupyter_server's sessions (``/api/sessions``), kept in the gateway's database.

    Every replica sees the same ones (stock keeps them in a per-process SQLite table). A session
    belongs to whoever made it: others neither list, read, change nor delete it (an admin sees
    all). Its kernel may have been started through another replica: it is adopted first.
    """

    def get_kernel_env(self, path: str | None, name: Any = None) -> dict[str, str]:
        # Stock: the server's whole environment. Here the server is the gateway: nothing of it.
        return {}

    @property
    def db(self) -> Any:
        return self.kernel_manager.db

    async def _rows(self, **where: Any) -> list[dict[str, Any]]:
        if any(column not in SESSION_COLUMNS for column in where):
            raise TypeError(f"no such column among {sorted(where)}")
        user = caller()
        query = select(JupyterSession).where(
            *(getattr(JupyterSession, column) == value for column, value in where.items())
        )
        if not user.is_admin:
            query = query.where(JupyterSession.owner_id == user.id)
        async with self.db() as db:
            rows = (await db.scalars(query.order_by(JupyterSession.created_at))).all()
        return [{column: getattr(row, column) for column in SESSION_COLUMNS} for row in rows]

    async def _delete_row(self, session_id: str) -> None:
        async with self.db() as db, db.begin():
            await db.execute(delete(JupyterSession).where(JupyterSession.session_id == session_id))

    async def save_session(
        self,
        session_id: str,
        path: str | None = None,
        name: str | None = None,
        type: str | None = None,
        kernel_id: str | None = None,
    ) -> dict[str, Any]:
        async with self.db() as db, db.begin():
            db.add(
                JupyterSession(
                    session_id=session_id,
                    owner_id=caller().id,
                    path=path,
                    name=name,
                    type=type,
                    kernel_id=kernel_id,
                    created_at=datetime.now(UTC),
                )
            )
        return await self.get_session(session_id=session_id)

    async def row_to_model(self, row: Any, tolerate_culled: bool = False) -> Any:
        if row["kernel_id"]:
            await self.kernel_manager.adopt(row["kernel_id"])  # started through another replica
        if await self.kernel_culled(row["kernel_id"]):
            # Its kernel is gone (shut down, culled, or it died): the session goes with it.
            await self._delete_row(row["session_id"])
            if tolerate_culled:
                return None
            raise KeyError(f"the kernel of session {row['session_id']} is gone; the session was removed")
        kernel_model = self.kernel_manager.kernel_model(row["kernel_id"])
        model = {
            "id": row["session_id"],
            "path": row["path"],
            "name": row["name"],
            "type": row["type"],
            "kernel": kernel_model,
        }
        if row["type"] == "notebook":
            model["notebook"] = {"path": row["path"], "name": row["name"]}  # the deprecated API
        return model

    async def session_exists(self, path: str) -> bool:
        # Paths are per user: another user's "Untitled.ipynb" is not this one's.
        for row in await self._rows(path=path):
            if await self.row_to_model(row, tolerate_culled=True) is not None:
                return True
        return False

    async def get_session(self, **kwargs: Any) -> dict[str, Any]:
        if not kwargs:
            raise TypeError("must specify a column to query")
        for row in await self._rows(**kwargs):
            try:
                return await self.row_to_model(row)
            except KeyError:  # its kernel is gone; row_to_model removed the row
                continue
        raise web.HTTPError(404, "Session not found")

    async def list_sessions(self) -> list[dict[str, Any]]:
        out = []
        for row in await self._rows():
            try:
                out.append(await self.row_to_model(row))
            except KeyError:
                pass
        return out

    async def update_session(self, session_id: str, **kwargs: Any) -> None:
        await self.get_session(session_id=session_id)  # 404 unless the caller's
        if not kwargs:
            return
        if any(column not in SESSION_COLUMNS - {"session_id"} for column in kwargs):
            raise TypeError(f"no such column among {sorted(kwargs)}")
        async with self.db() as db, db.begin():
            await db.execute(
                update(JupyterSession).where(JupyterSession.session_id == session_id).values(**kwargs)
            )
        (row,) = await self._rows(session_id=session_id)
        if row["kernel_id"]:
            self.kernel_manager.update_env(
                kernel_id=row["kernel_id"], env=self.get_kernel_env(row["path"], row["name"])
            )

    async def delete_session(self, session_id: str) -> None:
        session = await self.get_session(session_id=session_id)  # 404 unless the caller's
        await self.kernel_manager.shutdown_kernel(session["kernel"]["id"])
        await self._delete_row(session_id)


class KernelsHandler(MainKernelHandler):
    """POST /api/kernels honours ``env`` (``KERNEL_*`` and the operator's allowlist), checked.

    GET lists the caller's kernels whichever replica started them.
    """

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method == "GET":
            await self.kernel_manager.adopt_all()

    async def post(self) -> None:
        model = self.get_json_body() or {}
        if not isinstance(model, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        try:
            env = validate_env(model.get("env"))  # the same checks as /v1, agent-set variables too
        except ApiError as e:
            raise web.HTTPError(e.status, e.title) from None
        name = model.get("name") or self.kernel_manager.default_kernel_name
        if not isinstance(name, str):
            raise web.HTTPError(400, "name must be a kernelspec name")
        try:
            spec = self.kernel_spec_manager.get_kernel_spec(name)
        except Exception:
            raise web.HTTPError(404, f"no kernelspec {name!r}") from None
        # Refuse now what the placement path would refuse (policy, image, size): a clear 4xx to
        # the client instead of a kernel that dies while starting.
        config = spec.metadata.get("kernel_provisioner", {}).get("config", {})
        try:
            req = SessionRequest.from_json(
                {"image": config.get("image", ""), "resources": config.get("resources", {})},
                rules=self.settings["resource_rules"],
            )
            await self.settings["sessions"].check(caller(), req)
            named = [(n.strip(), "rw") for n in env.get("KERNEL_VFOLDERS", "").split(",") if n.strip()]
            await resolve_mounts(self.settings["vfolders"], caller(), named, "")
        except ApiError as e:
            raise web.HTTPError(e.status, e.title) from None
        try:
            kernel_id = await self.kernel_manager.start_kernel(
                kernel_name=name,
                path=model.get("path"),
                env=env,  # start_kernel keeps what may pass
            )
        except LaunchTimeout as e:
            raise web.HTTPError(504, str(e)) from None
        except LaunchError as e:
            raise web.HTTPError(503, str(e)) from None
        model = self.kernel_manager.kernel_model(kernel_id)
        self.set_header("Location", f"/api/kernels/{kernel_id}")
        self.set_status(201)
        self.finish(json.dumps(model, default=str))


def _session_body(handler: Any, *, creating: bool) -> dict[str, Any]:
    """A session request body checked for shape (stock jupyter_server answers odd ones with 500)."""
    model = handler.get_json_body()
    if not isinstance(model, dict):
        raise web.HTTPError(400, "the body must be a JSON object")
    for field in ("path", "type", "name"):
        if field in model and not isinstance(model[field], str | None):
            raise web.HTTPError(400, f"{field} must be a string")
    if creating and not (isinstance(model.get("path"), str) and isinstance(model.get("type"), str)):
        raise web.HTTPError(400, "path and type are required strings")
    kernel = model.get("kernel")
    if kernel is not None and not (
        isinstance(kernel, dict) and all(isinstance(kernel.get(k), str | None) for k in ("id", "name"))
    ):
        raise web.HTTPError(400, "kernel must be an object with a string name or id")
    return model


async def _refuse_others_kernel(handler: Any, *, creating: bool = False) -> None:
    """404 when a session body names a kernel the caller does not own (it exists, but not for them)."""
    model = _session_body(handler, creating=creating)
    kernel = model.get("kernel") if isinstance(model, dict) else None
    kernel_id = kernel.get("id") if isinstance(kernel, dict) else None
    km = handler.kernel_manager
    if isinstance(kernel_id, str):
        await km.adopt(kernel_id)  # started through another replica
    if isinstance(kernel_id, str) and kernel_id in km and not km.visible(kernel_id):
        raise web.HTTPError(404, f"Kernel does not exist: {kernel_id}")


class OwnedSessionRootHandler(SessionRootHandler):
    """POST /api/sessions: naming someone else's kernel is 404, not a new session attached to it."""

    @web.authenticated
    async def post(self) -> None:
        await _refuse_others_kernel(self, creating=True)
        await super().post()


class OwnedSessionHandler(SessionHandler):
    """PATCH /api/sessions/{id}: a session cannot be moved onto someone else's kernel."""

    @web.authenticated
    async def patch(self, session_id: str) -> None:
        await _refuse_others_kernel(self)
        await super().patch(session_id)


class OwnedKernelHandler(KernelHandler):
    """GET and DELETE /api/kernels/{id}: also a kernel another replica started."""

    async def prepare(self) -> None:
        await super().prepare()
        await self.kernel_manager.adopt(self.path_kwargs["kernel_id"])


class OwnedKernelActionHandler(KernelActionHandler):
    """Interrupt and restart: someone else's kernel is 404 (stock turns any error into 500)."""

    async def prepare(self) -> None:
        await super().prepare()
        await self.kernel_manager.adopt(self.path_kwargs["kernel_id"])

    @web.authenticated
    async def post(self, kernel_id: str, action: str) -> None:
        km = self.kernel_manager
        km._check_kernel_id(kernel_id)
        if action == "restart" and kernel_id in km.adopted:
            await km.restart_adopted(kernel_id)
            self.finish(json.dumps(km.kernel_model(kernel_id), default=str))
            return
        await super().post(kernel_id, action)


class FastKernelWebsocketHandler(KernelWebsocketHandler):
    """The kernel websocket with Nagle off: stock tornado costs ~44 ms per message otherwise.

    A kernel another replica started is adopted first, so a websocket works on any replica.
    """

    async def get(self, kernel_id: str) -> None:  # type: ignore[override]
        await self.kernel_manager.adopt(kernel_id)
        await super().get(kernel_id)

    def open(self, *args: Any, **kwargs: Any) -> Any:
        self.set_nodelay(True)
        return super().open(*args, **kwargs)


def jupyter_handlers_and_settings(
    data_dir: str, sessions: Any, vfolders: Any, rules: Any, env_allowlist: set[str], log: Any
) -> tuple[list[Any], dict[str, Any]]:
    """jupyter_server's kernel, kernelspec and session handlers, configured for the gateway."""
    from jupyter_server.kernelspecs.handlers import default_handlers as kernelspec_resources
    from jupyter_server.serverapp import ServerApp
    from jupyter_server.services.api.handlers import default_handlers as api_handlers
    from jupyter_server.services.kernels.handlers import default_handlers as kernel_handlers
    from jupyter_server.services.kernelspecs.handlers import default_handlers as kernelspec_handlers
    from jupyter_server.services.sessions.handlers import default_handlers as session_handlers
    from traitlets.config import Config

    root = Path(data_dir) / "jupyter-root"  # sessions' paths are names, not files on this host
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = Config()
    config.ServerApp.root_dir = str(root)
    config.ServerApp.open_browser = False
    config.ServerApp.identity_provider_class = TokenIdentityProvider
    config.ServerApp.kernel_manager_class = BackendAIMappingKernelManager
    config.ServerApp.session_manager_class = OwnedSessionManager
    config.ServerApp.disable_check_xsrf = True  # token-authenticated API clients, no cookies
    config.ServerApp.allow_remote_access = True
    config.ServerApp.terminals_enabled = False
    config.BackendAIMappingKernelManager.env_allowlist = env_allowlist
    config.BackendAIMappingKernelManager.default_kernel_name = "backendai-python3"
    config.ServerApp.kernel_spec_manager_class = GatewayKernelSpecManager
    # POST /api/kernels answers as soon as the kernel is requested ("starting"); its model says
    # where the launch stands (queued and why, placed, running); the websocket waits for it.
    config.BackendAIMappingKernelManager.use_pending_kernels = True
    app = ServerApp(config=config, log=log)
    app.initialize(argv=[], find_extensions=False, new_httpserver=False)
    app.kernel_manager.db = sessions.db
    app.kernel_manager.sessions = sessions
    app.kernel_manager.vfolders = vfolders
    app.kernel_manager.resource_rules = rules
    app.kernel_spec_manager.sessions = sessions
    empty = Path(data_dir) / "kernelspec-no-resources"
    empty.mkdir(exist_ok=True, mode=0o700)
    app.kernel_spec_manager.empty_resource_dir = str(empty)
    app.kernel_spec_manager.logo_root = str(Path(data_dir) / "kernelspec-logos")
    settings = dict(app.web_app.settings)
    handlers = []
    for pattern, handler, *rest in [
        *api_handlers,
        *kernel_handlers,
        *kernelspec_handlers,
        *session_handlers,
        *kernelspec_resources,
    ]:
        if handler is MainKernelHandler:
            handler = KernelsHandler
        elif handler is KernelHandler:
            handler = OwnedKernelHandler
        elif handler is KernelActionHandler:
            handler = OwnedKernelActionHandler
        elif handler is KernelWebsocketHandler:
            handler = FastKernelWebsocketHandler
        elif handler is SessionRootHandler:
            handler = OwnedSessionRootHandler
        elif handler is SessionHandler:
            handler = OwnedSessionHandler
        handlers.append((pattern, handler, *rest))
    return handlers, settings
