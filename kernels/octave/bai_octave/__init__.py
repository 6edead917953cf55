"""octave_kernel with Octave's errors as Jupyter errors (``OctaveError``)."""

from .kernel import OctaveErrorKernel

__all__ = ["OctaveErrorKernel"]
