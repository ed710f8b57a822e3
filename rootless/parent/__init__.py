"""The parent: the supervisor's side of the run (rootless-run's process)."""
