"""The state dir and the registry of running instances."""
