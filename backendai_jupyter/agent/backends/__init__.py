"""Container backends: how an agent turns a kernel launch into a running container."""
