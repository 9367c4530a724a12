"""First-party processors."""
