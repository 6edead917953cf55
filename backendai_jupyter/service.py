"""The base of the long-running commands (gateway, agent, up): configuration files and signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from jupyter_core.application import JupyterApp
from traitlets import Unicode, default


class ServiceApp(JupyterApp):
    """Common base for the long-running subcommands.

    Options come from the command line, from ``--config=FILE``, and from
    ``backendai_jupyter_config.py`` (or ``.json``) in Jupyter's config path
    (``jupyter --paths``), so operators can keep them in a file.
    """

    config_file_name = Unicode("backendai_jupyter_config", help="Config file name (without extension).")

    @default("log_level")
    def _log_level_default(self) -> int:
        return logging.INFO

    @default("log_format")
    def _log_format_default(self) -> str:
        return "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def _run_until_signal(self, start: Any, stop: Any) -> None:
        async def main() -> None:
            stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            try:
                await start()
            except Exception as e:
                self.log.error("%s", e)
                raise SystemExit(1) from None
            # After start: what starts may install handlers of its own (jupyter_server does).
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stopping.set)
            await stopping.wait()
            self.log.info("stopping ...")
            await stop()

        logging.basicConfig(level=self.log_level, format=self.log_format)
        logging.getLogger("tornado.access").setLevel(logging.WARNING)
        asyncio.run(main())
