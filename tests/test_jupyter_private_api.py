"""The private members of jupyter_server and jupyter_client that the Kernel Gateway API relies on.

``gateway/jupyter_api.py`` overrides or reads them; pyproject.toml bounds both packages below
their next major version. Within those bounds a release could still rename one: this test says
which, before any kernel fails to start.
"""

from __future__ import annotations

import inspect

import pytest
from jupyter_client.multikernelmanager import MultiKernelManager
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager, ServerKernelManager

from backendai_jupyter.gateway.jupyter_api import BackendAIKernelManager, BackendAIMappingKernelManager


@pytest.mark.parametrize(
    ("cls", "name", "params"),
    [
        (ServerKernelManager, "_async_pre_start_kernel", {"kw"}),
        (AsyncMappingKernelManager, "_check_kernel_id", {"kernel_id"}),
        (AsyncMappingKernelManager, "_finish_kernel_start", {"kernel_id"}),
    ],
)
def test_the_private_methods_we_override_exist_with_their_parameters(cls, name, params):
    method = getattr(cls, name, None)
    assert callable(method), f"{cls.__name__}.{name} is gone"
    assert params <= set(inspect.signature(method).parameters), inspect.signature(method)


def test_the_private_attributes_we_read_exist():
    assert "_kernels" in MultiKernelManager.class_traits()
    assert isinstance(MultiKernelManager()._pending_kernels, dict)
    # An adopted kernel (started through another replica) is entered as jupyter_server enters
    # the kernels it starts: its connection count and ports.
    mapping = AsyncMappingKernelManager()
    assert isinstance(mapping._kernel_connections, dict)
    assert isinstance(mapping._kernel_ports, dict)


def test_our_managers_still_override_them():
    assert "_async_pre_start_kernel" in vars(BackendAIKernelManager)
    for name in ("_check_kernel_id", "_finish_kernel_start"):
        assert name in vars(BackendAIMappingKernelManager), name
