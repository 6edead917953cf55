"""Kernelspec templates that name the Backend.AI provisioner."""
