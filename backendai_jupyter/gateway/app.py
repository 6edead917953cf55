"""The gateway process: configuration, database, and the Tornado application."""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import secrets
import ssl
from pathlib import Path
from typing import Any

import yaml
from tornado import httpserver, web
from traitlets import Bool, Dict, Enum, Float, Int, List, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from .. import __version__
from ..common.errors import ApiError
from ..common.slots import ResourceSlot, SlotError
from ..common.tls import MIN_VERSION, ca_file_from_env
from ..common.wire import AGENT_WS_PATH
from . import db as dbmod
from .agent_auth import AgentAuthenticator
from .auth import Authenticator
from .bus import Bus
from .events import EventHub
from .handlers.admin import (
    PoliciesHandler,
    PolicyHandler,
    UserHandler,
    UserKeypairHandler,
    UsersHandler,
    UserTokenHandler,
)
from .handlers.agents import AgentConnectHandler, AgentKeyHandler, AgentsHandler, DrainHandler
from .handlers.base import ApiHandler, NotFoundHandler
from .handlers.sessions import (
    InterruptHandler,
    RestartHandler,
    SessionEventsHandler,
    SessionHandler,
    SessionsHandler,
    SignalHandler,
)
from .jupyter_api import jupyter_handlers_and_settings
from .replay import NonceCache, NonceTable, ReplayCache
from .requests import ResourceRules, parse_bytes
from .sessions import SessionService
from .vfolders.handlers import vfolder_routes
from .vfolders.service import VFolderService

log = logging.getLogger(__name__)
SID = r"(?P<sid>[0-9a-f-]{36})"


class GatewayApplication(web.Application):
    """The gateway's Tornado application; jupyter_server's /api/status asks it when it was last busy."""

    def last_activity(self) -> Any:
        """The latest of: start, kernel activity, API activity (what jupyter_server reports)."""
        settings = self.settings
        return max(
            settings["started"],
            settings["kernel_manager"].last_kernel_activity,
            *settings.get("last_activity_times", {}).values(),
        )


class InfoHandler(ApiHandler):
    async def get(self) -> None:
        self.write_json(
            {"version": __version__, "user": self.current_user.name, "is_admin": self.current_user.is_admin}
        )


class OpenApiHandler(ApiHandler):
    """GET /v1/openapi.json: the API's description, for anyone.

    Served without credentials: it says nothing the source does not, and clients and tools
    read it before they have a keypair.
    """

    async def prepare(self) -> None:
        try:
            self._check_length()
        except ApiError as e:
            self.send_api_error(e)
            return
        self._body = bytearray()

    async def get(self) -> None:
        self.write_json(openapi_spec())


@functools.cache
def openapi_spec() -> dict[str, Any]:
    """The hand-written OpenAPI document of /v1 shipped with the package."""
    return yaml.safe_load((Path(__file__).parent / "openapi.yaml").read_text())


def is_loopback(host: str) -> bool:
    """Whether a bind address only reaches this host (``""``, ``0.0.0.0`` and ``::`` reach all)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to may be reachable from elsewhere


class InsecureBind(Exception):
    """A non-loopback address without TLS, not explicitly allowed."""


def _slots_trait(value: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        ResourceSlot.parse(value)
    except SlotError as e:
        raise ValueError(f"{name}: {e}") from None
    return value


class Gateway(LoggingConfigurable):
    """The manager and API gateway: REST /v1, the scheduler and the agent registry."""

    ip = Unicode(help="Address to listen on (env BACKENDAI_GATEWAY_IP).").tag(config=True)

    @default("ip")
    def _ip_default(self) -> str:
        return os.environ.get("BACKENDAI_GATEWAY_IP", "127.0.0.1")

    port = Int(help="Port to listen on (env BACKENDAI_GATEWAY_PORT).").tag(config=True)

    @default("port")
    def _port_default(self) -> int:
        return int(os.environ.get("BACKENDAI_GATEWAY_PORT", "8470"))

    public_url = Unicode(
        help="URL clients and agents use to reach the gateway; derived from ip and port when empty "
        "(env BACKENDAI_GATEWAY_URL)."
    ).tag(config=True)

    @default("public_url")
    def _public_url_default(self) -> str:
        return os.environ.get("BACKENDAI_GATEWAY_URL", "")

    certfile = Unicode(
        help="PEM certificate (chain) to serve HTTPS and WSS with, e.g. the gateway.pem of "
        "`backendai-jupyter certs create`; plain HTTP when empty (env BACKENDAI_GATEWAY_CERTFILE)."
    ).tag(config=True)

    @default("certfile")
    def _certfile_default(self) -> str:
        return os.environ.get("BACKENDAI_GATEWAY_CERTFILE", "")

    keyfile = Unicode(
        help="PEM private key of certfile; when empty the key is read from certfile "
        "(env BACKENDAI_GATEWAY_KEYFILE)."
    ).tag(config=True)

    @default("keyfile")
    def _keyfile_default(self) -> str:
        return os.environ.get("BACKENDAI_GATEWAY_KEYFILE", "")

    ca_file = Unicode(
        help="PEM CA that signed certfile, trusted when the gateway calls its own URL (kernels of the "
        "Kernel Gateway API); the ca.pem beside certfile when empty and present, else the system "
        "trust store (env BACKENDAI_CA_FILE)."
    ).tag(config=True)

    @default("ca_file")
    def _ca_file_default(self) -> str:
        return ca_file_from_env()

    allow_insecure = Bool(
        help="Serve plain HTTP on an address other hosts can reach. Keypairs, tokens and the agent "
        "token then cross the network in the clear: only for a network you trust entirely "
        "(env BACKENDAI_GATEWAY_ALLOW_INSECURE=1)."
    ).tag(config=True)

    @default("allow_insecure")
    def _allow_insecure_default(self) -> bool:
        return os.environ.get("BACKENDAI_GATEWAY_ALLOW_INSECURE", "") in ("1", "true", "yes")

    replay_cache_size = Int(
        500_000,
        help="Most signed requests remembered (for 5 minutes each) to refuse replays; beyond it "
        "signed requests get 503 until older ones expire. With replicas on PostgreSQL: the rows "
        "of the table they share, counted by each replica every 30 s.",
    ).tag(config=True)

    data_dir = Unicode(help="Directory for the database and secrets (env BACKENDAI_DATA_DIR).").tag(
        config=True
    )

    @default("data_dir")
    def _data_dir_default(self) -> str:
        if os.environ.get("BACKENDAI_DATA_DIR"):
            return os.environ["BACKENDAI_DATA_DIR"]
        from jupyter_core.paths import jupyter_data_dir

        return str(Path(jupyter_data_dir()) / "backendai")

    db_url = Unicode(
        help="SQLAlchemy async URL of the database; embedded SQLite in data_dir when empty "
        "(env BACKENDAI_DB_URL)."
    ).tag(config=True)

    @default("db_url")
    def _db_url_default(self) -> str:
        return os.environ.get("BACKENDAI_DB_URL", "")

    agent_token = Unicode(
        help="The join token: a new agent presents it once, with the key it made for itself, to be "
        "enrolled under its id; afterwards only that agent's own key is accepted. Generated into "
        "data_dir/agent-token when empty (env BACKENDAI_AGENT_TOKEN)."
    ).tag(config=True)

    @default("agent_token")
    def _agent_token_default(self) -> str:
        return os.environ.get("BACKENDAI_AGENT_TOKEN", "")

    allow_agent_join = Bool(
        True,
        help="Whether the join token enrolls new agents. Turn it off once every agent is enrolled: "
        "a leaked join token then adds nothing.",
    ).tag(config=True)
    heartbeat_interval = Float(5.0, help="Seconds between agent heartbeats.").tag(config=True)
    heartbeat_timeout = Float(
        20.0, help="An agent silent this many seconds is marked lost, with its kernels."
    ).tag(config=True)
    pending_timeout = Float(
        300.0, help="A session not placed within this many seconds ends in ERROR (0: wait forever)."
    ).tag(config=True)
    max_pending_per_user = Int(
        100,
        help="Most sessions one user may have waiting to be placed, whatever their policy says: the "
        "agents' port ranges and the scheduler's queue are finite.",
    ).tag(config=True)
    client_stream_grace = Float(
        5.0,
        help="Seconds a session bound to its client (the launcher, the Kernel Gateway API's kernels) "
        "outlives the client's event stream; a client that reconnects within it keeps its kernel.",
    ).tag(config=True)
    destroy_retry_interval = Float(
        2.0, help="Seconds between attempts to remove a kernel's container when a removal failed."
    ).tag(config=True)
    default_resources = Dict(
        {"cpu": "1", "mem": "1g"}, help="Resources of a session that asks for none."
    ).tag(config=True)
    max_resources = Dict(
        {}, help="Most a single session may have per slot; larger requests are clamped to it."
    ).tag(config=True)
    min_resources = Dict(
        {"cpu": "0.1", "mem": "64m"},
        help="Least a single session must ask for per slot; smaller requests are refused (400). "
        "A slot without a minimum here may still not be 0: a container with no limit is not an empty one.",
    ).tag(config=True)
    max_request_body = Int(
        help="Largest request body in bytes (1 MiB unless set); larger ones are refused with 413 "
        "before they are read (env BACKENDAI_MAX_REQUEST_BODY)."
    ).tag(config=True)

    @default("max_request_body")
    def _max_request_body_default(self) -> int:
        return int(os.environ.get("BACKENDAI_MAX_REQUEST_BODY", str(2**20)))

    @validate("max_request_body")
    def _valid_max_request_body(self, proposal: Any) -> int:
        if proposal["value"] < 1024:
            raise ValueError(f"max_request_body: at least 1024 bytes, got {proposal['value']}")
        return proposal["value"]

    storage_volumes = Dict(
        {},
        help="Storage volumes vfolders live on: name → directory on this host. In a cluster each is a "
        "filesystem every agent mounts at the same path (NFS, CephFS, ...; an agent maps another path "
        "with Agent.volume_paths). Empty: one volume 'local' under data_dir/volumes/local.",
    ).tag(config=True)
    default_volume = Unicode(
        "", help="The volume new vfolders go to unless a request names one; the first volume when empty."
    ).tag(config=True)
    vfolder_owner = Unicode(
        "1000:1000",
        help="Numeric uid:gid that owns what the file API writes into vfolders: the uid:gid kernels run as "
        "(Agent.kernel_user), so files are writable from both sides. Run the gateway as root, or as that "
        "uid, to honour it.",
    ).tag(config=True)
    default_vfolder_quota = Unicode(
        "10g", help="Quota of a vfolder created without one (a size such as '10g' or '500m')."
    ).tag(config=True)
    vfolder_usage_interval = Float(
        60.0,
        help="Seconds between re-measurements of the vfolders running kernels mount (what kernels "
        "write shows in the usage at the latest after this long).",
    ).tag(config=True)
    max_upload_chunk = Int(
        64 * 2**20,
        help="Largest body of one file write (PUT .../content, a chunk of a resumable upload), "
        "streamed to disk; larger files go in chunks.",
    ).tag(config=True)
    kernel_env_allowlist = List(
        Unicode(),
        [],
        help="Environment variables a Kernel Gateway client may pass to kernels besides KERNEL_*.",
    ).tag(config=True)
    scheduler_policy = Enum(
        ["fifo", "drf"],
        "fifo",
        help="Who goes first among pending sessions: arrival order, or dominant-resource fairness "
        "across users.",
    ).tag(config=True)
    agent_selector = Enum(
        ["auto", "concentrated", "dispersed"],
        "auto",
        help="Where a session goes: pack (concentrated), spread (dispersed), or auto (pack GPU "
        "sessions, spread CPU-only ones).",
    ).tag(config=True)

    @validate("default_resources", "max_resources", "min_resources")
    def _valid_slots(self, proposal: Any) -> dict[str, Any]:
        return _slots_trait(proposal["value"], proposal["trait"].name)

    # -- running -----------------------------------------------------------------------------

    def resource_rules(self) -> ResourceRules:
        """Defaults, maxima and minima of a session's resources, checked against each other."""
        rules = ResourceRules(
            default=ResourceSlot.parse(self.default_resources),
            maximum=ResourceSlot.parse(self.max_resources),
            minimum=ResourceSlot.parse(self.min_resources),
        )
        for slot, least in rules.minimum.items():
            if slot in rules.maximum and rules.maximum[slot] < least:
                raise ValueError(
                    f"Gateway.min_resources {slot} is above Gateway.max_resources {slot}: "
                    "no request could pass; lower the minimum or raise the maximum"
                )
        try:
            rules.apply(ResourceSlot())
        except SlotError as e:
            raise ValueError(f"Gateway.default_resources: {e}") from None
        return rules

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.ip in ("", "0.0.0.0", "::") else self.ip
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.certfile else 'http'}://{host}:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The server context for certfile/keyfile (TLS 1.2 at least), or None for plain HTTP."""
        if not self.certfile:
            if not is_loopback(self.ip):
                if not self.allow_insecure:
                    raise InsecureBind(
                        f"refusing to serve plain HTTP on {self.ip or 'all addresses'}: other hosts "
                        "could read keypairs and tokens on the wire. Give the gateway a certificate "
                        "(`backendai-jupyter certs create --dir DIR --host NAME`, then "
                        "--Gateway.certfile=DIR/gateway.pem --Gateway.keyfile=DIR/gateway-key.pem), "
                        "bind 127.0.0.1 behind a TLS proxy, or pass --Gateway.allow_insecure=True "
                        "on a network you trust entirely"
                    )
                log.warning(
                    "INSECURE: serving plain HTTP on %s (Gateway.allow_insecure): keypairs, tokens "
                    "and the agent token cross the network in the clear",
                    self.ip or "all addresses",
                )
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = MIN_VERSION
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile or None)
        except FileNotFoundError as e:
            raise ValueError(f"Gateway.certfile/keyfile: {e.filename} does not exist") from None
        except (ssl.SSLError, OSError) as e:
            raise ValueError(
                f"cannot load the certificate {self.certfile} with key {self.keyfile or '(in certfile)'} "
                f"({e}): give a PEM certificate and its matching private key"
            ) from None
        return ctx

    def own_ca_file(self) -> str:
        """The CA to verify the gateway's own certificate with ("" for the system store)."""
        if self.ca_file or not self.certfile:
            return self.ca_file
        beside = Path(self.certfile).resolve().with_name("ca.pem")  # as `certs create` writes it
        return str(beside) if beside.exists() else ""

    def _secret_file(self, name: str) -> Path:
        return Path(self.data_dir) / name

    def _load_or_create_agent_token(self) -> str:
        if self.agent_token:
            return self.agent_token
        path = self._secret_file("agent-token")
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token

    async def start(self) -> None:
        """Migrate the database, make the first admin, and start serving."""
        ssl_ctx = self._ssl_context()  # refuse a bad TLS setup before touching anything
        Path(self.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240 (startup)
        url = self.db_url or f"sqlite+aiosqlite:///{Path(self.data_dir) / 'gateway.sqlite'}"
        await dbmod.migrate(url)
        self.engine = dbmod.make_engine(url)
        sessionmaker = dbmod.make_sessionmaker(self.engine)
        self.authenticator = Authenticator(sessionmaker)
        created = await self.authenticator.ensure_admin()
        admin_file = self._secret_file("admin-keypair.json")
        if created:
            fd = os.open(admin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"access_key": created[0], "secret_key": created[1], "token": created[2]}, f)
        self.agent_token = self._load_or_create_agent_token()
        self.hub = EventHub()
        rules = self.resource_rules()
        self.sessions = SessionService(
            sessionmaker,
            self.hub,
            default_resources=ResourceSlot.parse(self.default_resources),
            pending_timeout=self.pending_timeout,
            heartbeat_timeout=self.heartbeat_timeout,
            policy=self.scheduler_policy,
            selector=self.agent_selector,
            stream_grace=self.client_stream_grace,
            max_pending=self.max_pending_per_user,
            destroy_retry=self.destroy_retry_interval,
            bus=Bus(self.engine),
        )
        await self.sessions.start()
        self.vfolders = self._vfolder_service(sessionmaker)
        await self.vfolders.start()
        self.nonces: ReplayCache = (
            NonceTable(sessionmaker, self.replay_cache_size)
            if self.engine.dialect.name == "postgresql"  # replicas may share the database
            else NonceCache(self.replay_cache_size)
        )
        await self.nonces.start()
        self.sessions.kernel_ended_with_mounts = self.vfolders.measure_mounted
        jupyter_handlers, jupyter_settings = jupyter_handlers_and_settings(
            self.data_dir, self.sessions, self.vfolders, rules, set(self.kernel_env_allowlist), self.log
        )
        self.app = GatewayApplication(
            [
                (r"/v1/?", InfoHandler),
                (r"/v1/openapi.json", OpenApiHandler),
                (AGENT_WS_PATH, AgentConnectHandler),
                (r"/v1/admin/users/?", UsersHandler),
                (r"/v1/admin/users/(?P<name>[^/]+)", UserHandler),
                (r"/v1/admin/users/(?P<name>[^/]+)/token", UserTokenHandler),
                (r"/v1/admin/users/(?P<name>[^/]+)/keypair", UserKeypairHandler),
                (r"/v1/admin/policies/?", PoliciesHandler),
                (r"/v1/admin/policies/(?P<name>[^/]+)", PolicyHandler),
                (r"/v1/agents/?", AgentsHandler),
                (r"/v1/agents/(?P<agent_id>[^/]+)/(?P<action>drain|undrain)", DrainHandler),
                (r"/v1/agents/(?P<agent_id>[^/]+)/key", AgentKeyHandler),
                (r"/v1/sessions/?", SessionsHandler),
                (rf"/v1/sessions/{SID}/?", SessionHandler),
                (rf"/v1/sessions/{SID}/interrupt", InterruptHandler),
                (rf"/v1/sessions/{SID}/signal", SignalHandler),
                (rf"/v1/sessions/{SID}/restart", RestartHandler),
                (rf"/v1/sessions/{SID}/events", SessionEventsHandler),
                *vfolder_routes(),
                (r"/v1/.*", NotFoundHandler),
                *jupyter_handlers,
            ],
            **{
                **jupyter_settings,
                "xsrf_cookies": False,
                "sessions": self.sessions,
                "vfolders": self.vfolders,
                "max_upload_chunk": self.max_upload_chunk,
                "hub": self.hub,
                "authenticator": self.authenticator,
                "agent_auth": AgentAuthenticator(
                    sessionmaker,
                    self.agent_token,
                    self.sessions.registry,
                    self.heartbeat_interval,
                    self.allow_agent_join,
                ),
                "resource_rules": rules,
                "max_request_body": self.max_request_body,
                "nonces": self.nonces,
                "heartbeat_interval": self.heartbeat_interval,
                "websocket_ping_interval": 20,
            },
        )
        # The outer bound for every handler, /api and websockets included; /v1 refuses earlier,
        # from the headers, with a JSON 413.
        self.server = httpserver.HTTPServer(
            self.app,
            xheaders=False,
            ssl_options=ssl_ctx,
            max_body_size=self.max_request_body,
            # File bodies arrive in pieces this big (tornado's default, 64 KiB, costs a Python
            # round per piece: a quarter of an upload's time).
            chunk_size=1 << 20,
        )
        self.server.listen(self.port, self.ip)
        log.info("gateway listening on %s", self.url)

    def volumes(self) -> dict[str, str]:
        """The storage volumes, the default one filled in."""
        return dict(self.storage_volumes) or {"local": str(Path(self.data_dir) / "volumes" / "local")}

    def _vfolder_service(self, sessionmaker: Any) -> VFolderService:
        volumes = self.volumes()
        uid, _, gid = self.vfolder_owner.partition(":")
        if not (uid.isdigit() and (gid or uid).isdigit()):
            raise ValueError(f"Gateway.vfolder_owner must be a numeric uid:gid, got {self.vfolder_owner!r}")
        return VFolderService(
            sessionmaker,
            volumes,
            self.default_volume or next(iter(volumes)),
            (int(uid), int(gid or uid)),
            parse_bytes(self.default_vfolder_quota, "Gateway.default_vfolder_quota"),
            self.sessions.mounted_vfolders,
            self.vfolder_usage_interval,
        )

    def admin_credentials(self) -> dict[str, str]:
        """The first admin's keypair and token, as written on first start."""
        return json.loads(self._secret_file("admin-keypair.json").read_text())

    async def stop(self) -> None:
        self.server.stop()
        self.app.settings["kernel_manager"].release()
        await self.nonces.stop()
        await self.vfolders.stop()
        await self.sessions.stop()
        await self.engine.dispose()
