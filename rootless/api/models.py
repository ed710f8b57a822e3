"""API bodies, with rootlesskit's JSON field names. Empty optional fields are omitted,
as rootlesskit's Go structs do with omitempty."""
import msgspec


class PortSpec(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    # kw_only: fields in rootlesskit's order, optional ones among them.
    proto: str
    parentIP: str = ""
    parentPort: int = 0  # rootlessctl omits 0 (Go omitempty): "pick a free port"
    childIP: str = ""
    childPort: int


class PortStatus(msgspec.Struct, omit_defaults=True):
    id: int
    spec: PortSpec


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
