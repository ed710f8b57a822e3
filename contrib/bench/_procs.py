"""Processes of the benchmark.

Every command runs as the benchmark user (through setpriv when the benchmark runs as
root), in a session of its own, and is tracked until it is gone: `stop()` ends one,
`stop_all()` ends whatever is left, also after Ctrl-C. A supervisor's helpers may
leave its process group (slirp4netns gets one of its own), so a stop kills what is
left of the session and of the process tree, not only the group.
"""
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


class Skip(Exception):
    """This side of a scenario cannot run here; the message says why and what to do."""


class Runner:
    def __init__(self, user: str | None):
        self.as_root = os.getuid() == 0
        if self.as_root:
            pw = pwd.getpwnam(user or "rlt-test")  # KeyError: no such user
        else:
            pw = pwd.getpwuid(os.getuid())
            if user and user != pw.pw_name:
                raise PermissionError(f"--user {user}: only root can run the benchmark as "
                                      f"another user (you are {pw.pw_name})")
        self.user, self.uid = pw.pw_name, pw.pw_uid
        self.env = {
            "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "PATH": PATH,
            "XDG_RUNTIME_DIR": f"/run/user/{pw.pw_uid}", "LANG": "C.UTF-8",
        }
        # setpriv execs: the pid we get is the pid of the command itself.
        self.prefix = (["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                        "--init-groups", "--"] if self.as_root else [])
        self._live: dict[int, subprocess.Popen] = {}

    def which(self, tool: str) -> str | None:
        """The tool as the benchmark user finds it (its PATH, not ours)."""
        return shutil.which(tool, path=self.env["PATH"])

    def start(self, argv: list[str], *, stdout=subprocess.DEVNULL,
              stdin=subprocess.DEVNULL, outer: list[str] = ()) -> subprocess.Popen:
        """Start `argv` as the user, in a new session; stderr goes to a temp file
        (a pipe nobody reads could fill up and stall it), see `last_error()`.
        `outer`: a command run as root that execs the rest (e.g. `ip netns exec NS`)."""
        errors = tempfile.TemporaryFile()
        proc = subprocess.Popen([*outer, *self.prefix, *argv], env=self.env, cwd="/tmp",
                                stdin=stdin, stdout=stdout, stderr=errors,
                                start_new_session=True)
        proc.errors = errors
        self._live[proc.pid] = proc
        return proc

    def run(self, argv: list[str], timeout: float, *,
            input: bytes | None = None, outer: list[str] = ()) -> tuple[int, str]:
        """Run to the end, `input` on its stdin; (exit status, stdout). Stopped if it
        outlives `timeout`."""
        proc = self.start(argv, stdout=subprocess.PIPE, outer=outer,
                          stdin=subprocess.DEVNULL if input is None else subprocess.PIPE)
        try:
            out, _ = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise Skip(f"{' '.join(argv[:3])}... did not finish within {timeout:.0f} s")
        finally:
            if proc.returncode is not None:
                self.stop(proc)  # its leftovers, if any
        return proc.returncode, out.decode(errors="replace")

    def time_once(self, argv: list[str], outer: list[str] = ()) -> float:
        """Wall time of one run, from fork to exit (setpriv's own exec, and `outer`'s,
        are counted the same for every implementation)."""
        start = time.perf_counter()
        proc = self.start(argv, outer=outer)
        status = proc.wait()
        elapsed = time.perf_counter() - start
        self.stop(proc)
        if status != 0:
            raise Skip(f"{' '.join(argv)} failed (exit {status}): {last_error(proc)}")
        return elapsed

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM to the process group (the supervisor forwards it to the command),
        then SIGKILL to everything left of its session and process tree."""
        if proc.returncode is None:
            members = _tree_and_session(proc.pid)
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        else:
            members = set()
        members |= _tree_and_session(proc.pid)
        for pid, started in members:
            if _start_time(pid) == started:  # the same process, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        self._live.pop(proc.pid, None)

    def stop_all(self) -> None:
        for proc in list(self._live.values()):
            self.stop(proc, grace=2.0)


def last_error(proc: subprocess.Popen) -> str:
    """The last non-empty line the process wrote to stderr."""
    proc.errors.seek(0)
    lines = [line.strip() for line in proc.errors.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else "no error output"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _stat(pid: str) -> tuple[int, int, int] | None:
    """(ppid, session, start time) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _start_time(pid: int) -> int | None:
    stat = _stat(str(pid))
    return stat[2] if stat else None


def _tree_and_session(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of the processes in `root`'s session or under `root`."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(entry)):
            table[int(entry)] = stat
    found = {pid for pid, (_, session, _) in table.items() if session == root}
    if root in table:
        found.add(root)
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return {(pid, table[pid][2]) for pid in found}


def tree(root: int) -> list[int]:
    """`root` and its descendants (for memory figures)."""
    return sorted(pid for pid, _ in _tree_and_session(root))


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def parent(pid: int) -> int | None:
    stat = _stat(str(pid))
    return stat[0] if stat else None


def memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes, from smaps_rollup."""
    pss = rss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    return pss, rss


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def user_can_run(runner: Runner, path: str) -> bool:
    code, _ = runner.run(["test", "-x", path], timeout=10)
    return code == 0


def make_link_dir(target: str, name: str) -> str:
    """A temp dir, readable by everyone, with `name` -> `target` (to invoke our
    program under rootlesskit's name, which gives it rootlesskit's defaults)."""
    directory = tempfile.mkdtemp(prefix="rootless-bench-")
    os.chmod(directory, 0o755)
    os.symlink(target, os.path.join(directory, name))
    return directory
