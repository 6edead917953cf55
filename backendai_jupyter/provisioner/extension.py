"""The Jupyter Server extension: the user's Backend.AI status inside Jupyter, and vfolder paths.

To browse and edit the user's vfolders instead of this server's disk, add one line to the
server's config (``jupyter_server_config.py``)::

    c.ServerApp.contents_manager_class = "backendai_jupyter.provisioner.contents.VFolderContentsManager"

With that contents manager active, the extension makes the kernel manager start a notebook's
kernel in the notebook's folder as the kernel sees it: the API path ``<vfolder>/<dir>`` becomes
``~/<vfolder>/<dir>`` (with ``VFolderContentsManager.root_vfolder`` set,
``~/<root_vfolder>/<path>``), and a path at the top level ``~``. This holds for
local kernels (the provisioner gets it as ``cwd``) and with ``--gateway-url`` (jupyter_server sends
it as ``KERNEL_WORKING_DIR``). A kernelspec that runs kernels on this machine would get that
directory too, which does not exist here: use Backend.AI kernelspecs with vfolders.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.application import ExtensionApp
from tornado import web

from ..common.errors import ApiError, LaunchError
from .client import GatewayClient
from .contents import VFolderContentsManager
from .provisioner import client_config


class StatusHandler(APIHandler):
    """GET /backendai/status: the gateway this server talks to, its agents and our sessions."""

    @web.authenticated
    async def get(self) -> None:
        try:
            cfg = client_config("", "", "", "")
        except LaunchError as e:
            self.set_status(503)
            self.finish(json.dumps({"type": "not-configured", "title": str(e)}))
            return
        client = GatewayClient.instance(cfg)
        try:
            agents = await client.run(client.request("GET", "/v1/agents"))
            sessions = await client.run(client.request("GET", "/v1/sessions?active=1"))
        except ApiError as e:
            self.set_status(e.status if e.status >= 400 else 502)
            self.finish(json.dumps(e.to_json()))
            return
        self.finish(json.dumps({"gateway": cfg.url, **agents, **sessions}))


class BackendAIExtension(ExtensionApp):
    """Backend.AI inside Jupyter Server."""

    name = "backendai_jupyter"

    def initialize_handlers(self) -> None:
        self.handlers.append((r"/backendai/status", StatusHandler))

    def initialize_settings(self) -> None:
        if use_vfolder_cwd(self.serverapp):
            self.log.info("Kernels start in their notebook's vfolder directory (in the kernel's home)")


def use_vfolder_cwd(serverapp: Any) -> bool:
    """With the vfolder contents manager active, map API paths to kernel directories in vfolders.

    Replaces ``cwd_for_path`` on the server's kernel manager instance; returns whether it did.
    """
    cm = getattr(serverapp, "contents_manager", None)
    km = getattr(serverapp, "kernel_manager", None)
    if not isinstance(cm, VFolderContentsManager) or km is None:
        return False
    km.cwd_for_path = cm.kernel_cwd
    return True
