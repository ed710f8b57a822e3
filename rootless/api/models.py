"""API bodies, with rootlesskit's JSON field names. Empty optional fields are omitted,
as rootlesskit's Go structs do with omitempty. The ports' bodies are the port model's
(rootless.ports: PortSpec, PortStatus, plain classes kept free of msgspec): their
schemas are built here from the model's FIELDS, and the API converts at its edge,
with port_spec() and port_status() one way and encode_hook the other."""
import msgspec

from ..ports import REQUIRED, PortSpec, PortStatus

_SCHEMAS: dict = {}  # port model class -> its Struct


def _schema(model):
    """The msgspec Struct of a port model class: the same name, fields (in order) and
    defaults; a field that holds a model holds its Struct."""
    fields = [(name, _SCHEMAS.get(kind, kind)) if default is REQUIRED
              else (name, _SCHEMAS.get(kind, kind), default)
              for name, kind, default in model.FIELDS]
    # kw_only: a required field (childPort) may follow optional ones
    _SCHEMAS[model] = msgspec.defstruct(model.__name__, fields, omit_defaults=True,
                                        kw_only=True)
    return _SCHEMAS[model]


PortSpecBody = _schema(PortSpec)
PortStatusBody = _schema(PortStatus)


def port_spec(body) -> PortSpec:
    """A decoded PortSpecBody as the port model's PortSpec."""
    return PortSpec(**msgspec.structs.asdict(body))


def port_status(body) -> PortStatus:
    """A decoded PortStatusBody as the port model's PortStatus."""
    return PortStatus(id=body.id, spec=port_spec(body.spec))


def encode_hook(value):
    """msgspec's enc_hook: a PortSpec or PortStatus as its body (a PortStatus' spec
    comes back here in turn)."""
    schema = _SCHEMAS.get(type(value))
    if schema is None:
        raise NotImplementedError(f"cannot encode a {type(value).__name__}")
    return schema(**value.asdict())


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
