"""REST and websocket handlers, one module per resource."""
