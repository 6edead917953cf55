"""What a kernelspec's ``argv`` runs when a client ignores ``metadata.kernel_provisioner``.

Clients on jupyter_client >= 7 use the provisioner and never run this. Older clients (and
VS Code's local kernel picker) run ``argv`` directly; relaying their channels to a remote
kernel is not built yet, so this tells the user plainly what to use instead.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "This Backend.AI kernel needs a Jupyter client that supports kernel provisioners "
        "(jupyter_client >= 7: JupyterLab, Notebook 7, jupyter console, nbclient, papermill). "
        "This client started the kernelspec's command directly, which is not supported yet.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
