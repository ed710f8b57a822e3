"""What a port driver provides (parent side; the child side comes with the drivers)."""
from ...config import Config


class PortDriver:
    name: str = ""

    def __init__(self, config: Config):
        self.config = config

    def preflight(self) -> None:
        """Check the driver can work with this network driver and these specs."""

    def opaque(self) -> dict[str, str]:
        """Driver data for the child, sent in ParentInitPortDriverCompleted."""
        return {}
