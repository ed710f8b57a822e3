"""What a network driver provides. Drivers never import cli, parent or child, and
never import trio at module level (the child imports the chosen driver)."""
from ...config import Config


class NetworkDriver:
    name: str = ""
    #: False only for host: the child then shares the host's network namespace.
    new_netns: bool = True
    #: True when the driver runs helper processes the parent must supervise
    #: (the parent then runs its trio event loop).
    has_helpers: bool = False

    def __init__(self, config: Config):
        self.config = config

    def preflight(self) -> None:
        """Check what the driver needs (binaries, devices) before any namespace exists;
        raise a RootlessError naming the cause and the fix."""

    def info(self, child_pid: int, state_dir: str):
        """Parent side, for drivers without helpers: a messages.NetworkInfo for the
        child to configure, or None when there is nothing to configure."""
        return None

    @staticmethod
    def configure_child(info) -> None:
        """Child side, inside the new namespaces, before the command starts."""
