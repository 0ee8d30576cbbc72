"""Training: losses, optimizer, the sharded train step."""
