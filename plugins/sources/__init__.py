"""First-party sources."""
