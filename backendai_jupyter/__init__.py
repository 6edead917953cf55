"""backendai-jupyter: Jupyter kernels in containers on remote GPU agents, placed by a gateway."""

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    """Tell Jupyter Server where the extension app lives."""
    from .provisioner.extension import BackendAIExtension

    return [{"module": "backendai_jupyter.provisioner.extension", "app": BackendAIExtension}]
