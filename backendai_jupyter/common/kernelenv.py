"""Which environment variables a user may set in a kernel: the loader's and drivers' are not theirs.

The container runtime and its GPU hooks read some variables to decide what a container gets
(``NVIDIA_VISIBLE_DEVICES=all`` would hand out every GPU on the host), and the dynamic loader
reads others to run code before the kernel does. Those are set by the agent from what the
gateway allocated, never by a request. The gateway refuses them with a clear error; the agent
drops them again, so an order from an older gateway cannot pass them either.
"""

from __future__ import annotations

# Exact names nobody but the agent sets.
DENIED_NAMES = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "GPU_DEVICE_ORDINAL",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "HOME",
    }
)
# Prefixes: the dynamic loader (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...), the NVIDIA container
# runtime (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, ...), MPS, and our own.
DENIED_PREFIXES = ("LD_", "NVIDIA_", "CUDA_MPS_", "BACKENDAI_")


def is_denied(name: str) -> bool:
    """True for a variable only the agent may set in a kernel's environment."""
    upper = name.upper()
    return upper in DENIED_NAMES or upper.startswith(DENIED_PREFIXES)
