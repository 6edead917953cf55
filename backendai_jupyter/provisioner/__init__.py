"""Client side: the kernel provisioner, the /v1 client and the Jupyter Server extension."""
