"""The agent: runs kernel containers on one host for the gateway."""
