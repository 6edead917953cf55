"""The kernel provisioner: jupyter_client asks it for a kernel, it asks the gateway.

jupyter_client's ``KernelManager`` drives every method here (see
``jupyter_client.provisioning.provisioner_base``). The kernel runs in a container on an
agent; once it is RUNNING the client talks ZMQ straight to it, and nothing on the message
path passes through the gateway.
"""

from __future__ import annotations

import fnmatch
import os
import signal
from pathlib import Path
from typing import Any, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Dict, Float, List, Unicode, Union, default

from ..common.clientconfig import ClientConfig, default_path
from ..common.errors import ApiError, Conflict, LaunchError, LaunchTimeout
from ..common.kernelenv import is_denied
from ..common.states import SessionState
from ..common.tls import ca_file_from_env
from ..common.wire import KERNEL_HOME
from .client import GatewayClient, SessionWatch
from .settings import GatewaySettings


def client_config(
    gateway_url: str, access_key: str, secret_key: str, path: str, ca_file: str = ""
) -> ClientConfig:
    """The effective client config: explicit values win over the client config file."""
    file_path = Path(path) if path else default_path()
    found = ClientConfig.load(file_path)
    if found is None and not (gateway_url and access_key and secret_key):
        raise LaunchError(
            f"no Backend.AI client config at {file_path}. Start the gateway with "
            "`backendai-jupyter up` (it writes that file), or set BACKENDAI_GATEWAY_URL, "
            "BACKENDAI_ACCESS_KEY and BACKENDAI_SECRET_KEY."
        )
    return ClientConfig(
        url=gateway_url or (found.url if found else ""),
        access_key=access_key or (found.access_key if found else ""),
        secret_key=secret_key or (found.secret_key if found else ""),
        ca_file=ca_file or (found.ca_file if found else ca_file_from_env()),
    )


class BackendAIProvisioner(GatewaySettings, KernelProvisionerBase):  # type: ignore[metaclass]  # both derive from MetaHasTraits
    """Provisions kernels in containers on Backend.AI agents through the gateway."""

    image = Unicode("backendai-jupyter/python:latest", help="Container image of the kernel.").tag(config=True)
    resources = Dict(help="Resources to request, e.g. {'cpu': '1', 'mem': '2g'}.").tag(config=True)
    ca_file = Unicode(
        help="PEM CA file that signed an https gateway's certificate; overrides the client config's "
        "ca_file and BACKENDAI_CA_FILE (empty: those, else the system trust store)."
    ).tag(config=True)

    client_config_path = Unicode(
        help="Client config file; <jupyter config dir>/backendai_client.json when empty "
        "(env BACKENDAI_CLIENT_CONFIG)."
    ).tag(config=True)

    launch_timeout = Float(
        help="Seconds from request to a running kernel, queueing included (env BACKENDAI_LAUNCH_TIMEOUT)."
    ).tag(config=True)

    @default("launch_timeout")
    def _launch_timeout_default(self) -> float:
        return float(os.environ.get("BACKENDAI_LAUNCH_TIMEOUT", "300"))

    forward_env = List(
        Unicode(),
        ["KERNEL_*"],
        help="Names (glob patterns) of local environment variables passed to the remote kernel, "
        "besides the kernelspec's own env.",
    ).tag(config=True)

    mounts = List(
        Union([Unicode(), Dict()]),
        help="vfolders to mount into the kernel at ~/<name> (the kernel user's home): names, or "
        '{"name": NAME, "mode": "ro"} objects. KERNEL_VFOLDERS (comma-separated names) adds to them.',
    ).tag(config=True)

    bind_to_stream = Bool(
        False,
        help="End the kernel when this process's event stream to the gateway is gone for good (the "
        "gateway's own Kernel Gateway kernels, which nobody can reach once that process is gone).",
    ).tag(config=True)

    session_id: str | None = None
    # The session's name is "<prefix>:<kernel id>" (the gateway's own kernels use their own prefix).
    session_prefix = "jupyter"
    # Sessions this provisioner asked to end (a shutdown or a restart from here, not elsewhere).
    _ended: frozenset[str] = frozenset()
    # After cleanup(restart=True): the session the next launch replaces (same ports and key).
    _restart_of: str | None = None
    _cancelled = False  # the launch was given up while in progress
    _client: GatewayClient | None = None

    # -- helpers --------------------------------------------------------------------------------

    @property
    def client(self) -> GatewayClient:
        if self._client is None:
            cfg = client_config(
                self.gateway_url, self.access_key, self.secret_key, self.client_config_path, self.ca_file
            )
            self._client = GatewayClient.instance(cfg)
        return self._client

    def _event(self) -> dict[str, Any]:
        return self.client.cached_state(self.session_id) if self.session_id else {}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return await self.client.run(self.client.request(method, path, body))
        except ApiError as e:
            raise LaunchError(e.title) from None

    # -- the provisioner contract -------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        """True while a session exists for this kernel."""
        return self.session_id is not None

    async def poll(self) -> int | None:
        """None while the kernel lives; its exit code once over. Answered from pushed state."""
        event = self._event()
        if not event or not SessionState(event["state"]).is_terminal:
            return None
        code = event.get("exit_code")
        return int(code) if code is not None else (0 if event["state"] == "TERMINATED" else 1)

    async def wait(self) -> int | None:
        """Wait until the session is over."""
        if self.session_id is None:
            return None
        sid = self.session_id
        await self.client.run(self.client.wait_for(sid, _over))
        return await self.poll()

    async def send_signal(self, signum: int) -> None:
        """SIGINT interrupts the kernel; other signals reach its process through the agent."""
        if self.session_id is None or signum == 0 or await self.poll() is not None:
            return  # nothing to signal: jupyter_client interrupts even dead kernels on shutdown
        if signum == signal.SIGKILL:
            await self.kill()
            return
        try:
            if signum == signal.SIGINT:
                await self.client.run(
                    self.client.request("POST", f"/v1/sessions/{self.session_id}/interrupt")
                )
            else:
                name = signal.Signals(signum).name
                path = f"/v1/sessions/{self.session_id}/signal"
                await self.client.run(self.client.request("POST", path, {"signal": name}))
        except Conflict as e:
            # Not running (still starting, or just ended): there is no process to signal.
            self.log.warning("signal %s not delivered: %s", signum, e.title)
        except ApiError as e:
            raise LaunchError(e.title) from None

    async def kill(self, restart: bool = False) -> None:
        """Remove the kernel's container at once."""
        await self._delete()

    async def terminate(self, restart: bool = False) -> None:
        """Ask the kernel to stop (SIGTERM reaches it through the container's init)."""
        if self.session_id and await self.poll() is None:
            try:
                await self._call("POST", f"/v1/sessions/{self.session_id}/signal", {"signal": "SIGTERM"})
            except LaunchError:
                await self._delete()

    async def cancel_launch(self) -> None:
        """Give up a launch in progress (its client shut the kernel down while it was starting)."""
        self._cancelled = True
        await self._delete()

    def ended_here(self, sid: str) -> bool:
        """Whether this provisioner asked for the end of session ``sid``."""
        return sid in self._ended

    async def _delete(self) -> None:
        if self.session_id is None:
            return
        self._ended |= {self.session_id}
        try:
            await self._call("DELETE", f"/v1/sessions/{self.session_id}")
        except LaunchError as e:
            self.log.warning("could not end kernel session %s: %s", self.session_id, e)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Work out the remote kernel's environment; the session is requested in launch_kernel."""
        kwargs = await super().pre_launch(**kwargs)
        local_env: dict[str, str] = kwargs.pop("env")
        spec_env = set(self.kernel_spec.env or {})
        # A forwarded local variable the agent sets itself (HOME, LD_*, ...) would only get the
        # request refused: it is left behind. One the kernelspec names is sent, and refused clearly.
        remote = {
            k: v
            for k, v in local_env.items()
            if k in spec_env
            or (not is_denied(k) and any(fnmatch.fnmatchcase(k, pat) for pat in self.forward_env))
        }
        kwargs["remote_env"] = remote
        kwargs["cmd"] = list(self.kernel_spec.argv)
        kwargs["vfolders"] = self._vfolder_request(remote, kwargs.get("cwd"))
        return kwargs

    def _vfolder_request(self, env: dict[str, str], cwd: str | os.PathLike[str] | None) -> dict[str, Any]:
        """The vfolders to mount and where the kernel starts.

        Jupyter names the notebook's folder: ``cwd`` on start_kernel, or ``KERNEL_WORKING_DIR``
        from a Kernel Gateway client. With the vfolder contents manager that is the folder's
        place in the container (``~/<vfolder>/...``), and the gateway mounts that vfolder
        and starts the kernel there. Anything else is a local path that means nothing in the
        container: the image's own working directory stays.
        """
        out: dict[str, Any] = {}
        mounts = list(self.mounts)
        mounts += [n.strip() for n in env.get("KERNEL_VFOLDERS", "").split(",") if n.strip()]
        if mounts:
            out["mounts"] = mounts
        where = str(env.get("KERNEL_WORKING_DIR") or cwd or "")  # nbclient passes a Path
        if where.startswith(KERNEL_HOME + "/"):
            out["working_dir"] = where
        return out

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Create a kernel session, wait for it to run, and return how to reach it."""
        body = {
            "image": self.image,
            "resources": dict(self.resources),
            "env": kwargs.get("remote_env", {}),
            "name": f"{self.session_prefix}:{self.kernel_id}",
            **kwargs.get("vfolders", {}),
        }
        if self.bind_to_stream:
            body["bound_to_stream"] = True
        if self._restart_of:
            body["restart_of"] = self._restart_of
            self._restart_of = None
        model = await self._call("POST", "/v1/sessions", body)
        self.session_id = model["id"]
        sid = model["id"]
        if self._cancelled:
            await self._delete()
            self.session_id = None
            raise LaunchError("the kernel was shut down while it was starting")
        try:
            w = await self.client.run(self.client.wait_for(sid, running_or_over, timeout=self.launch_timeout))
        except TimeoutError:
            await self._delete()
            self.session_id = None
            raise LaunchTimeout(
                f"the kernel did not start within {self.launch_timeout:.0f} s "
                f"(last state: {self._describe(sid)}); it was cancelled"
            ) from None
        if w.state != SessionState.RUNNING:
            self.session_id = None
            raise LaunchError(f"the kernel could not start: {w.event.get('reason') or w.event['state']}")
        self.log.info("kernel session %s running on agent %s", sid, w.event.get("agent"))
        return self.running(w.event)

    def running(self, event: dict[str, Any]) -> KernelConnectionInfo:
        """Take the connection of the session's RUNNING event as this kernel's."""
        conn = dict(event["connection"])
        conn["key"] = conn["key"].encode()  # jupyter_client holds (and compares) keys as bytes
        self.connection_info = cast(KernelConnectionInfo, conn)
        return self.connection_info

    def _describe(self, sid: str) -> str:
        ev = self.client.cached_state(sid)
        return f"{ev.get('state', 'unknown')} {ev.get('reason', '')}".strip()

    async def cleanup(self, restart: bool = False) -> None:
        """End the session (if still alive) and stop following it."""
        if self.session_id is None:
            return
        if await self.poll() is None:
            await self._delete()
        self.client.forget(self.session_id)
        if restart:
            self._restart_of = self.session_id
        self.session_id = None

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info() or {}
        info.update({"session_id": self.session_id, "image": self.image})
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.session_id = provisioner_info.get("session_id")
        if self.session_id:
            self.client.submit(self._rewatch(self.session_id))

    async def _rewatch(self, sid: str) -> None:
        self.client.watch(sid)

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        # Removing a container with published ports takes ~0.4 s; give the kernel its time.
        return max(recommended, 3.0)


def _over(w: SessionWatch) -> bool:
    return w.state is not None and w.state.is_terminal


def running_or_over(w: SessionWatch) -> bool:
    return w.state is not None and (w.state == SessionState.RUNNING or w.state.is_terminal)
