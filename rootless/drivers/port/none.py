from ...errors import UsageError
from .base import PortDriver


class NoPortDriver(PortDriver):
    name = "none"

    def preflight(self) -> None:
        if self.config.publish:
            raise UsageError("-p/--publish needs a port driver: add --port-driver=builtin")
