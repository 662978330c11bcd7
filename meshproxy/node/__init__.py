"""Every core of the node: one supervisor and N worker processes (docs/workers.md)."""
