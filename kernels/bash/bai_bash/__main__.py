from ipykernel.kernelapp import IPKernelApp

from .kernel import BashErrorKernel

IPKernelApp.launch_instance(kernel_class=BashErrorKernel)
