"""What a network driver provides. Drivers never import cli, parent or child, and
never import trio at module level (the child imports the chosen driver)."""
from typing import ClassVar

from ...config import Config
from ...messages import NetworkInfo


class NetworkDriver:
    name: ClassVar[str] = ""
    #: False only for host: the child then shares the host's network namespace.
    new_netns: ClassVar[bool] = True
    #: True when the driver runs helper processes the parent must supervise
    #: (the parent then runs its trio event loop).
    has_helpers: ClassVar[bool] = False

    def __init__(self, config: Config):
        self.config = config

    def preflight(self) -> None:
        """Check what the driver needs (binaries, devices) before any namespace exists;
        raise a RootlessError naming the cause and the fix."""

    def info(self, child_pid: int, state_dir: str) -> NetworkInfo:
        """Parent side, for drivers without helpers: what the child should configure."""
        return NetworkInfo(driver=self.name)

    @staticmethod
    def configure_child(info: NetworkInfo) -> None:
        """Child side, inside the new namespaces, before the command starts."""
