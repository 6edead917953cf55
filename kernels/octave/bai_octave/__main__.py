from ipykernel.kernelapp import IPKernelApp

from .kernel import OctaveErrorKernel

IPKernelApp.launch_instance(kernel_class=OctaveErrorKernel)
