from .base import NetworkDriver


class HostDriver(NetworkDriver):
    """No network namespace: the command shares the host's network."""

    name = "host"
