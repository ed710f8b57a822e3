"""Name -> driver class, imported lazily so that only the chosen driver is loaded."""
from ..errors import NotSupportedYet, UsageError


class Registry:
    def __init__(self, flag: str, entry_point_group: str, builtin: dict[str, str],
                 planned: dict[str, str] | None = None, chosen_by_us: tuple[str, ...] = ()):
        self.flag = flag
        self.group = entry_point_group
        self.builtin = builtin    # name -> "module:Class"
        self.planned = planned or {}   # name -> why it is not available (yet)
        # Names the flag takes that the parent turns into a driver's name before it asks
        # the registry ("auto"): valid choices, listed with the others.
        self.chosen_by_us = chosen_by_us

    def get(self, name: str):
        target = self.builtin.get(name)
        if target is None:
            target = self._from_entry_points(name)
        if target is None:
            if name in self.planned:
                raise NotSupportedYet(f"{self.flag}={name} {self.planned[name]}")
            raise UsageError(f"{self.flag}={name}: no such driver; choose one of "
                             f"{', '.join(self.choices())}")
        module, _, cls = target.partition(":")
        # __import__, not importlib.import_module: the importlib package loads warnings
        # with it (55 KiB and 0.3 ms of every start-up).
        return getattr(__import__(module, fromlist=[cls]), cls)

    def choices(self) -> list[str]:
        """Every name the flag takes: ours, then those of installed plugins."""
        from importlib.metadata import entry_points
        plugins = sorted({ep.name for ep in entry_points(group=self.group)} - set(self.builtin))
        return [*self.chosen_by_us, *self.builtin, *plugins]

    def _from_entry_points(self, name: str) -> str | None:
        # importlib.metadata is slow to import: consulted only for unknown names.
        from importlib.metadata import entry_points
        for ep in entry_points(group=self.group):
            if ep.name == name:
                return ep.value
        return None
