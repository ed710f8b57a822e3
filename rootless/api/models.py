"""API bodies, with rootlesskit's JSON field names. Empty optional fields are omitted,
as rootlesskit's Go structs do with omitempty. The ports' bodies are the port model's
own (rootless.ports: PortSpec, PortStatus), served as they are."""
import msgspec


class NetworkDriverInfo(msgspec.Struct, omit_defaults=True):
    driver: str  # always present: "" for host
    dns: list[str] = []
    childIP: str = ""
    dynamicChildIP: bool = False


class PortDriverInfo(msgspec.Struct, omit_defaults=True):
    driver: str
    protos: list[str]
    disallowLoopbackChildIP: bool = False


class Info(msgspec.Struct, omit_defaults=True):
    apiVersion: str
    version: str
    stateDir: str
    childPID: int
    networkDriver: NetworkDriverInfo | None = None
    portDriver: PortDriverInfo | None = None


class ErrorBody(msgspec.Struct):
    message: str
