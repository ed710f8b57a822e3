"""What the run does for Docker, systemd and cgroups."""
