"""bash_kernel with errors that name themselves (``BashError``, the exit status)."""

from .kernel import BashErrorKernel

__all__ = ["BashErrorKernel"]
