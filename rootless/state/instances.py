"""Named instances, and how every running instance is found (`rootless-run --name`,
`rootless-ctl ps`, `stop`, and rootless-ctl's only-instance default).

`rootless-run --name NAME`: the state dir is $XDG_RUNTIME_DIR/rootless/NAME, made and
checked as any state dir (statedir: 0700, reached by the safe walk); `--state-dir`
still wins, and the name is then a label that finds it.

Every instance, named or not, records itself once its command runs:
- STATE/instance: its supervisor's pid and start time (the kernel's, in clock ticks
  since boot: a pid reused by another process does not match it), its name, drivers
  and command, NUL-separated (no escaping, and no json on the supervisor's path);
- STATE/exit_status: empty while it runs; the supervisor writes the run's status
  into it as it ends. `rootless-ctl stop` opens it before it signals and reads it
  once the supervisor is gone: the file goes with the run's files, but an open
  inode stays readable (a temp state dir is removed whole, so no file there could
  outlive the run);
- $XDG_RUNTIME_DIR/rootless/.registry/PID: a symlink to the state dir (so a temp
  state dir in /tmp is found too), made in a dir only the user can change. The
  supervisor removes it as it ends; after a SIGKILL it stays until a lookup finds it
  stale, and removes it: stale when the dir is gone, or its record is not that of a
  supervisor of that pid that still runs (see live_record: a live supervisor holds
  the lock, which lookups then need not touch).

Nothing here imports more than the standard library's os: `rootless-ctl enter` uses
the lookups, and the supervisor the recording.
"""
import os

from .. import _log
from .safewalk import describe
from ..errors import RootlessError, StateDirError, StateDirLocked, StateDirMissing, UsageError
from .statedir import (EXIT_STATUS, INSTANCE, StateDir, lock_held, open_dir, open_existing,
                       read_bytes)

BASE = "rootless"  # in $XDG_RUNTIME_DIR
REGISTRY = ".registry"  # in BASE; no name can start with a dot

NAME_MAX = 64  # characters; with /run/user/UID, the dir's sockets still fit in sun_path
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@:+")

_MAGIC = b"rootless-instance-1"
_COMMAND_LIMIT = 8192  # bytes of the command kept in the record: enough to show it
_RECORD_LIMIT = 16384


# -- names ----------------------------------------------------------------------------------

def check_name(name: str, what: str = "--name") -> str:
    """`name`, if it can name an instance: it becomes a dir's name, and is typed in
    shells and systemd unit names (rootless@NAME): letters, digits and ._-@:+, a
    letter or digit first (not '.', '..', a hidden name nor an option)."""
    problem = ""
    if not name:
        problem = "is empty"
    elif len(name) > NAME_MAX:
        problem = f"is {len(name)} characters long, more than {NAME_MAX}"
    elif "/" in name:
        problem = "has a '/'"
    elif not name[0].isascii() or not name[0].isalnum():
        problem = "does not start with a letter or a digit"
    else:
        bad = next((c for c in name if c not in _NAME_CHARS), "")
        if bad:
            problem = f"has {bad!r}, which a name cannot have"
    if problem:
        raise UsageError(f"{what} {name!r} {problem}: use letters, digits "
                         f"and . _ - @ : + (e.g. web, docker-1)")
    return name


def base_dir(needed_for: str = "--name", fix: str = ", or give --state-dir") -> str:
    """$XDG_RUNTIME_DIR/rootless; UsageError without a usable $XDG_RUNTIME_DIR."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not runtime.startswith("/"):
        raise UsageError(f"{needed_for} needs $XDG_RUNTIME_DIR (your session's runtime dir, "
                         f"/run/user/{os.getuid()}), which is "
                         f"{'not an absolute path' if runtime else 'not set'}: log in "
                         f"through a session (or loginctl enable-linger), or export "
                         f"XDG_RUNTIME_DIR=/run/user/{os.getuid()}{fix}")
    return os.path.join(runtime, BASE)


def named_dir(name: str) -> str:
    return os.path.join(base_dir(), check_name(name))


# -- what an instance records ---------------------------------------------------------------

class Record:
    """STATE/instance: what `ps` shows and `stop` signals."""
    __slots__ = ("pid", "start", "name", "net", "port_driver", "command")

    def __init__(self, pid: int, start: int, name: str, net: str, port_driver: str,
                 command: list[str]):
        self.pid, self.start, self.name = pid, start, name
        self.net, self.port_driver, self.command = net, port_driver, command

    def encode(self) -> bytes:
        command, size = [], 0
        for arg in self.command:
            data = os.fsencode(arg)
            size += len(data) + 1
            if size > _COMMAND_LIMIT:
                break
            command.append(data)
        fields = [_MAGIC, str(self.pid).encode(), str(self.start).encode(),
                  self.name.encode(), self.net.encode(), self.port_driver.encode()]
        return b"\0".join(fields + command)

    @classmethod
    def decode(cls, data: bytes) -> "Record | None":
        parts = data.split(b"\0")
        if len(parts) < 6 or parts[0] != _MAGIC:
            return None
        try:
            return cls(int(parts[1]), int(parts[2]), parts[3].decode(), parts[4].decode(),
                       parts[5].decode(), [os.fsdecode(arg) for arg in parts[6:]])
        except ValueError:  # UnicodeDecodeError too
            return None

    def alive(self) -> bool:
        """Whether the supervisor that wrote this still runs (its pid, its start)."""
        return process_start(self.pid) == self.start

    def uptime(self) -> float:
        """Seconds since the supervisor started."""
        try:
            with open("/proc/uptime", "rb") as f:
                now = float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        return max(0.0, now - self.start / os.sysconf("SC_CLK_TCK"))


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat's 22nd
    field); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def read_record(dir_fd: int) -> Record | None:
    """The record in the state dir `dir_fd`; None when there is none or it is not one.
    OSError when it cannot be read now."""
    try:
        data = read_bytes(dir_fd, INSTANCE, _RECORD_LIMIT)
    except ValueError:
        return None
    return None if data is None else Record.decode(data)


def live_record(path: str) -> tuple[str, Record] | None:
    """(real path, record) of the instance running on the state dir at `path`: its
    record names a supervisor that still runs. A live supervisor holds the dir's lock
    (it removes its record before it lets the lock go), and this check takes no lock:
    a lock taken for an instant to test it (as `enter` does) could make an instance
    starting on that dir at that instant fail. OSError when it cannot be told now."""
    try:
        dir_fd, real = open_existing(path)
    except StateDirMissing:
        return None
    try:
        record = read_record(dir_fd)
    finally:
        os.close(dir_fd)
    return (real, record) if record is not None and record.alive() else None


class Registration:
    """What a running instance recorded of itself (see the module's docstring): its
    status is written and its registry entry removed by close(), as it ends."""

    def __init__(self):
        self.status_fd = -1
        self.registry_fd = -1
        self.entry = ""

    def close(self, status: int) -> None:
        """Never raises: the run is ending, whatever fails here."""
        if self.status_fd >= 0:
            try:
                os.pwrite(self.status_fd, _status_text(status), 0)
            except OSError as exc:
                _log.warning(f"cannot record the run's exit status for rootless-ctl stop: "
                             f"{describe(exc)}")
            os.close(self.status_fd)
        if self.registry_fd >= 0:
            try:
                os.unlink(self.entry, dir_fd=self.registry_fd)
            except OSError:
                pass  # removed by someone (logind took $XDG_RUNTIME_DIR): gone either way
            os.close(self.registry_fd)
        self.status_fd = self.registry_fd = -1


def register(config, state: StateDir) -> Registration:
    """Record the instance whose command now runs (config: its drivers as chosen). A
    failure does not end the run (it serves on): one warning naming what will not
    find it."""
    registration = Registration()
    try:
        registration.status_fd = state.create(EXIT_STATUS)
        # Its room taken now: at the end, on a full disk, the status still fits.
        os.write(registration.status_fd, _status_text(None))
        record = Record(os.getpid(), process_start(os.getpid()) or 0, config.name, config.net,
                        config.port_driver, list(config.command))
        state.write(INSTANCE, record.encode())
    except (RootlessError, OSError) as exc:
        if state.removed():
            # by logind, tmpfiles or the command: the run goes on without its state
            # dir, quietly (docs/reliability.md, Failure behaviour)
            _log.debug(f"not registered: {state.path} was removed")
        else:
            _log.warning(f"cannot record the instance in {state.path}: {_why(exc)}; "
                         f"rootless-ctl stop and ps will not find it")
        return registration
    try:
        registration.registry_fd = _open_registry(create=True)
        registration.entry = _add_entry(registration.registry_fd, state.path)
    except UsageError as exc:
        _log.debug(f"not registered: {exc}")  # no $XDG_RUNTIME_DIR: nowhere to register
    except (RootlessError, OSError) as exc:
        _log.warning(f"cannot register the instance: {_why(exc)}; rootless-ctl ps will "
                     f"not list it (rootless-ctl --state-dir {state.path} finds it)")
    return registration


def _status_text(status: int | None) -> bytes:
    """STATE/exit_status: the status, or blanks until it is known, always 16 bytes."""
    return ("" if status is None else str(status)).ljust(15).encode() + b"\n"


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, RootlessError) else describe(exc)


def _add_entry(registry_fd: int, state_path: str) -> str:
    entry = str(os.getpid())
    tmp = f".{entry}.tmp"
    try:
        os.unlink(tmp, dir_fd=registry_fd)  # left by a run of ours killed here
    except FileNotFoundError:
        pass
    os.symlink(state_path, tmp, dir_fd=registry_fd)
    # over the entry of a dead supervisor whose pid we got, if any
    os.replace(tmp, entry, src_dir_fd=registry_fd, dst_dir_fd=registry_fd)
    return entry


def _open_registry(create: bool) -> int:
    """The registry dir's fd, once it is known to be the user's alone."""
    path = os.path.join(base_dir("finding instances", fix=" (instances started without "
                                 "it cannot be found)"), REGISTRY)
    fd, real, st = open_dir(path, create=create, what=f"the registry of instances {path}")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise StateDirError(f"{real} is not a dir of yours only (uid {st.st_uid}, mode "
                            f"{st.st_mode & 0o7777:04o}): remove it, it is made again")
    return fd


# -- finding instances ----------------------------------------------------------------------

class Instance:
    """A running instance, as a lookup found it."""
    __slots__ = ("path", "record")

    def __init__(self, path: str, record: Record):
        self.path, self.record = path, record

    @property
    def label(self) -> str:
        """What ps shows and messages name: the name, else the state dir."""
        return self.record.name or self.path

    def described(self) -> str:
        command = os.path.basename(self.record.command[0]) if self.record.command else "?"
        return f"{self.label} (pid {self.record.pid}, {_log.printable(command)})"


def running() -> list[Instance]:
    """The user's running instances, oldest first; the registry's stale entries are
    removed on the way. None when there is no registry yet; UsageError without
    $XDG_RUNTIME_DIR."""
    try:
        registry_fd = _open_registry(create=False)
    except StateDirMissing:
        return []
    try:
        try:
            entries = os.listdir(registry_fd)
        except OSError as exc:
            raise StateDirError(f"cannot list the registry of instances: {describe(exc)}"
                                ) from None
        found = []
        for entry in entries:
            if not entry.isdigit():
                _prune_tmp(registry_fd, entry)
                continue
            instance = _check_entry(registry_fd, entry)
            if instance is None:
                _log.debug(f"removing the stale registry entry {entry}")
                try:
                    os.unlink(entry, dir_fd=registry_fd)
                except OSError:
                    pass  # gone meanwhile; or a dir, not ours either: left alone
            elif instance is not _UNKNOWN:
                found.append(instance)
        return sorted(found, key=lambda i: i.record.start)
    finally:
        os.close(registry_fd)


def _prune_tmp(registry_fd: int, entry: str) -> None:
    """A .PID.tmp is a supervisor's entry being made, or left by one killed as it made
    it: removed once no process PID is left."""
    pid = entry[1:-4] if entry.startswith(".") and entry.endswith(".tmp") else ""
    if pid.isdigit() and process_start(int(pid)) is None:
        try:
            os.unlink(entry, dir_fd=registry_fd)
        except OSError:
            pass


_UNKNOWN = object()  # an entry that cannot be checked now: neither shown nor removed


def _check_entry(registry_fd: int, entry: str):
    """The Instance registry entry `entry` stands for; None when it is stale: its state
    dir is gone, or its record is not that of a supervisor with pid `entry` that runs."""
    try:
        path = os.readlink(entry, dir_fd=registry_fd)
    except FileNotFoundError:
        return _UNKNOWN  # removed meanwhile (its supervisor ended)
    except OSError:
        return None  # not a symlink: not ours
    try:
        found = live_record(path)
    except (StateDirError, OSError) as exc:  # not the user's any more, out of fds...
        _log.debug(f"cannot check the instance on {path}: {_why(exc)}")
        return _UNKNOWN
    if found is None or str(found[1].pid) != entry:
        return None  # another run on that dir has an entry of its own
    return Instance(*found)


def running_at(path: str) -> bool:
    """Whether an instance holds the lock of the state dir at `path` (one that is still
    starting too). It takes the lock for an instant if it is free: see live_record."""
    try:
        dir_fd, real = open_existing(path)
    except StateDirError:
        return False
    try:
        return lock_held(real, dir_fd)
    except OSError:
        return False
    finally:
        os.close(dir_fd)


def find(name: str) -> str | None:
    """The state dir of the running instance named `name`: its own dir, or the one
    the registry names (a --name with a --state-dir), or its own dir while an instance
    that is still starting holds it."""
    path = named_dir(name)
    try:
        if live_record(path):
            return path
    except (StateDirError, OSError):
        pass  # told below
    for instance in running():
        if instance.record.name == name:
            return instance.path
    return path if running_at(path) else None


def only() -> str:
    """The state dir of the user's only running instance: rootless-ctl's default."""
    try:
        found = running()
    except UsageError:
        raise UsageError("no instance given: give --name NAME, --state-dir DIR or --socket "
                         "STATE_DIR/api.sock, or set $ROOTLESSKIT_STATE_DIR (as it is inside "
                         "an instance); $XDG_RUNTIME_DIR is not set, so running instances "
                         "cannot be looked up") from None
    if len(found) == 1:
        return found[0].path
    if not found:
        raise UsageError("no running instance of yours was found: start one (rootless-run "
                         "--name NAME -- CMD), or give --socket STATE_DIR/api.sock or "
                         "--state-dir DIR of one (or set $ROOTLESSKIT_STATE_DIR)")
    raise UsageError(f"{len(found)} instances are running: "
                     f"{', '.join(i.described() for i in found)}; choose one with --name "
                     f"NAME or --state-dir DIR (rootless-ctl ps lists them)")


def state_dir_for(name: str | None, state_dir: str | None, socket: str | None) -> str:
    """The state dir rootless-ctl acts on: the one given (--name, --state-dir, or the
    dir of --socket), else $ROOTLESSKIT_STATE_DIR, else the only running instance."""
    given = [flag for flag, value in (("--name", name), ("--state-dir", state_dir),
                                      ("--socket", socket)) if value]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} each name an instance: give one of them")
    if name:
        path = find(name)
        if path is None:
            raise UsageError(f"no instance named {name} is running: start it with "
                             f"rootless-run --name {name} -- CMD (rootless-ctl ps lists "
                             f"the running ones)")
        return path
    if state_dir:
        return state_dir
    if socket:
        return os.path.dirname(socket) or "."
    return os.environ.get("ROOTLESSKIT_STATE_DIR") or only()


# -- starting a named instance --------------------------------------------------------------

def open_state(config) -> StateDir:
    """StateDir.open for the run; with --name, the name must not be running already
    (in its own dir, or in another one given by --state-dir)."""
    try:
        state = StateDir.open(config.state_dir)
    except StateDirLocked as exc:
        if config.name:
            raise _taken(config.name, config.state_dir) or exc from None
        raise
    if config.name:
        try:
            for instance in _running_if_known():
                if instance.record.name == config.name and instance.path != state.path:
                    raise StateDirError(_taken_message(config.name, instance))
        except BaseException:
            state.close()
            raise
    return state


def _running_if_known() -> list[Instance]:
    """running(), or none when there is no registry to look in (no $XDG_RUNTIME_DIR
    with a --state-dir, or a registry that is not the user's alone: register() says so)."""
    try:
        return running()
    except (UsageError, StateDirError, OSError) as exc:
        _log.debug(f"the running instances cannot be looked up: {_why(exc)}")
        return []


def _taken(name: str, path: str) -> StateDirLocked | None:
    """The error for `name` running in its dir `path` (locked): None if what holds the
    lock is not an instance of that name (the generic message then stands)."""
    try:
        dir_fd, real = open_existing(path)
    except StateDirError:
        return None
    try:
        record = read_record(dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    if record is None or record.name != name:
        return None
    # a StateDirLocked: `--reuse` joins it
    return StateDirLocked(_taken_message(name, Instance(real, record)))


def _taken_message(name: str, instance: Instance) -> str:
    command = " ".join(instance.record.command)
    return (f"an instance named {name} is running already (pid {instance.record.pid}, "
            f"{_log.printable(command[:60])}, state dir {instance.path}): stop it "
            f"(rootless-ctl stop {name}), join it (rootless-run --reuse --name {name} -- "
            f"CMD), or choose another --name")


# -- stopping -------------------------------------------------------------------------------

def stop(path: str, timeout: float) -> int:
    """`rootless-ctl stop`: SIGTERM to the supervisor of the instance on `path` (it
    forwards it to the command), wait until it has ended (at most `timeout` seconds)
    and return the run's exit status, as the supervisor recorded it."""
    from .._process import readable
    import _signal as signal  # the C module: see _process.py

    pidfd, status_fd, record, real = _grab(path)
    try:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            pass  # it ended meanwhile: its status is there all the same
        if not readable(pidfd, timeout):
            raise StopError(f"the instance on {real} (supervisor pid {record.pid}) has not "
                            f"ended within {timeout:g} s of SIGTERM: its command is still "
                            f"stopping; wait longer (stop --timeout SECONDS), or kill it "
                            f"(kill -KILL {record.pid})")
        text = os.pread(status_fd, 32, 0) if status_fd >= 0 else b""
    finally:
        os.close(pidfd)
        if status_fd >= 0:
            os.close(status_fd)
    if not text.strip().isdigit():
        raise StopError(f"the instance on {real} has ended, but its supervisor (pid "
                        f"{record.pid}) did not record the run's status (it was killed, "
                        f"or was ending already)")
    return int(text)


class StopError(RootlessError):
    """`stop` could not see the run end with its status."""


def _grab(path: str) -> tuple[int, int, Record, str]:
    """(pidfd of the supervisor, fd of its exit_status or -1 if it is ending already,
    its record, the dir's real path) of the instance running on `path`."""
    try:
        dir_fd, real = open_existing(path)
    except StateDirMissing:
        raise UsageError(f"no instance is running on {path} (it does not exist)") from None
    try:
        try:
            record = read_record(dir_fd)
        except OSError as exc:
            raise StateDirError(f"cannot read {real}/{INSTANCE}: {describe(exc)}") from None
        if record is None:
            if running_at(real):
                raise StopError(f"the instance on {real} has not recorded its supervisor "
                                f"({real}/{INSTANCE}): it is still starting, or it is not "
                                f"rootless-run's (rootlesskit's: signal its process)")
            raise UsageError(f"no instance is running on {real} (nobody holds {real}/lock)")
        try:
            pidfd = os.pidfd_open(record.pid)
        except ProcessLookupError:
            pidfd = -1
        # The pidfd is the recorded supervisor's if that one still runs now that it is
        # open: the pid is then not another process's.
        if pidfd < 0 or not record.alive():
            if pidfd >= 0:
                os.close(pidfd)
            raise UsageError(f"no instance is running on {real} (its supervisor, pid "
                             f"{record.pid}, has ended)")
        try:
            status_fd = os.open(EXIT_STATUS, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=dir_fd)
        except FileNotFoundError:
            status_fd = -1  # removed: the supervisor is ending already
        except BaseException:
            os.close(pidfd)
            raise
        return pidfd, status_fd, record, real
    finally:
        os.close(dir_fd)
