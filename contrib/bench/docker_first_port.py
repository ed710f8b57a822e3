"""Rootless Docker: time from `docker run -p` to the first HTTP answer, per supervisor.

After a fresh rootless dockerd is up, the first `docker run -d -p 127.0.0.1:P:80 ...`
makes dockerd's rootlesskit-docker-proxy publish P through the supervisor's REST API
(api.sock), which is when our supervisor loads its port code. This measures what a
user feels there, side by side:

  rootlesskit    Debian's unchanged /usr/share/docker.io/contrib/dockerd-rootless.sh,
                 PATH=/usr/sbin:/usr/bin:/sbin:/bin, so it finds /usr/bin/rootlesskit.
                 (/usr/local/bin is left out of every PATH: on the bench machine it
                 holds a docker-rootlesskit symlink to a venv, which the script would
                 pick before rootlesskit.)
  ours LABEL     the same script with VENV_BIN_DIR first in PATH: it finds that venv's
                 docker-rootlesskit (our supervisor) first.

Each round starts, per side (A, B, C, ... alternating within the round), a fresh
dockerd (new HOME and XDG_RUNTIME_DIR in /tmp/rlt-dbench-*, DOCKER_HOST on
$XDG_RUNTIME_DIR/docker.sock), waits for `docker info`, `docker import`s a busybox
rootfs (built once from the host's busybox as tests/test_docker.py does; nothing is
pulled), then times

  first  from just before `docker run -d -p 127.0.0.1:P:80 rlt-busybox httpd ...` to
         the first good HTTP GET of http://127.0.0.1:P/ (polled every 5 ms),
  warm   the same for a second container on another port,

and then takes the supervisor's memory (sum of PSS and of RSS from smaps_rollup over
its processes only: the process tree root and its descendants whose command line says
rootlesskit / rootless, not dockerd, containerd, slirp4netns nor dockerd's
rootlesskit-docker-proxy). It then removes the containers, SIGTERMs the script's
process group (SIGKILL after 30 s) and removes the temp dirs.

Everything Docker-related runs as the unprivileged --user (default rlt-bench) through
`setpriv --reset-env` with an explicit environment; the benchmark itself runs as root
and only talks to 127.0.0.1. Other processes of that user (another benchmark) are
left alone and only reported; whatever this one started is found by its sessions, its
dockerds' user namespaces and its temp dirs in the environment, and killed at the end
if a graceful stop left it behind:

    (from the checkout, as root) python3 -m contrib.bench.docker_first_port \\
        [--rounds 3] --ours main=/opt/rootless/venv/bin --ours branch=/opt/rootless/venv2/bin \\
        [--json FILE] [--user rlt-bench] [--keep-going]

The table gives per side the medians and, for each ours side, the ratio of its median
to rootlesskit's (under 1: ours is faster / smaller). --json writes every sample,
the supervisor's process list and the log lines about ports and errors.
"""
import argparse
import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from ._procs import cmdline, memory, tree

DOCKERD_ROOTLESS = "/usr/share/docker.io/contrib/dockerd-rootless.sh"
DOCKER = "/usr/bin/docker"  # Debian's client, of the daemon's version
BASE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PAGE = "hello from a rootless container\n"
IMAGE = "rlt-busybox"
PREFIX = "rlt-dbench-"
MARK = b"=/tmp/" + PREFIX.encode()  # in the environment of everything we start
HOST_USERNS = os.readlink("/proc/self/ns/user")
POLL = 0.005
NOT_SUPERVISOR = ("dockerd", "containerd", "slirp4netns", "rootlesskit-docker-proxy",
                  "docker-proxy", "vpnkit", "runc", "tini", "docker-init")
# log lines worth reporting: errors, anything about ports, and the supervisor's own
# lines (not logrus' time=..., not the script's `set -x` trace)
NOTABLE = re.compile(r"level=(error|fatal|panic)|\bports?\b|api\.sock|Traceback|^(?!time=|\+ )",
                     re.I)


class Failed(Exception):
    pass


class User:
    """Runs commands as the benchmark user: setpriv --reset-env, then `env -i` with
    exactly the environment given (--reset-env would put the passwd HOME back)."""

    def __init__(self, name: str):
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid = pw.pw_name, pw.pw_uid, pw.pw_gid
        self.live: list[subprocess.Popen] = []
        self.sessions: set[int] = set()
        self.userns: set[str] = set()

    def argv(self, argv: list[str], env: dict[str, str]) -> list[str]:
        full = {**env, "USER": self.name, "LOGNAME": self.name, "LANG": "C.UTF-8"}
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "--reset-env", "--", "env", "-i",
                *(f"{k}={v}" for k, v in full.items()), *argv]

    def popen(self, argv, env, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv, env), cwd=env.get("HOME", "/tmp"),
                                start_new_session=True, **kw)
        self.live.append(proc)
        self.sessions.add(proc.pid)
        return proc

    def run(self, argv, env, timeout=60, stdin=subprocess.DEVNULL) -> tuple[int, str]:
        proc = self.popen(argv, env, stdin=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc, grace=0)
            raise Failed(f"{' '.join(argv[:3])} did not finish within {timeout} s")
        finally:
            if proc in self.live and proc.returncode is not None:
                self.live.remove(proc)
        return proc.returncode, out.decode(errors="replace")

    def processes(self) -> list[str]:
        """Every process of the user (other benchmarks may use the same user)."""
        out = subprocess.run(["ps", "-u", self.name, "-o", "pid=,args="],
                             capture_output=True, text=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def note_userns(self, root: int) -> None:
        """Remember the user namespaces under `root` (dockerd's): containers' shims
        leave the process tree and the session, not the namespace."""
        for pid in tree(root):
            try:
                ns = os.readlink(f"/proc/{pid}/ns/user")
            except OSError:
                continue
            if ns != HOST_USERNS:
                self.userns.add(ns)

    def mine(self) -> list[int]:
        """The user's processes this benchmark started: in one of its sessions, in a
        user namespace of one of its dockerds, or with its temp dirs in the
        environment. Not the user's other processes."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid != self.uid:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    sid = int(f.read().rsplit(")", 1)[1].split()[3])
                ns = os.readlink(f"/proc/{entry}/ns/user")
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
            except (OSError, IndexError, ValueError):
                continue
            if sid in self.sessions or ns in self.userns or MARK in environ:
                found.append(int(entry))
        return found

    def describe(self, pids: list[int]) -> list[str]:
        return [f"{pid} {' '.join(cmdline(pid))[:160]}" for pid in pids]

    def kill_mine(self) -> None:
        for pid in self.mine():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_group(proc: subprocess.Popen, grace: float) -> bool:
    """SIGTERM the process group, wait `grace` s, then SIGKILL the group and whatever
    is left of the tree. True when it ended within the grace time."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            graceful = True
        except subprocess.TimeoutExpired:
            graceful = False
    else:
        graceful = True
    leftovers = tree(proc.pid) if proc.poll() is None else []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return graceful


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(port: int) -> bool:
    """One GET of http://127.0.0.1:port/ with short timeouts; True if it is the page."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(1.0)
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return False
    return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0] \
        and data.endswith(PAGE.encode())


def build_image_tar() -> tuple[str, str]:
    """(dir, tar): a busybox rootfs for `docker import`."""
    outdir = tempfile.mkdtemp(prefix=PREFIX + "img-")
    os.chmod(outdir, 0o755)
    tar = os.path.join(outdir, "busybox.tar")
    if not shutil.which("busybox"):
        raise Failed("busybox is not installed")
    busybox_rootfs_tar(tar, PAGE)
    return outdir, tar


def busybox_rootfs_tar(tar: str, page: str, extra: tuple[str, ...] = ()) -> None:
    """Write `tar`: the host's busybox, its libraries and its applets' links, and
    /www/index.html holding `page` (tests/test_docker.py imports it: nothing is
    pulled from the network); `extra`: more of the host's programs, in /bin with
    their libraries (socat: busybox has no UDP server)."""
    root = tar + ".root"
    os.makedirs(os.path.join(root, "bin"))
    for program in (shutil.which("busybox"), *extra):
        shutil.copy(program, os.path.join(root, "bin", os.path.basename(program)))
        libs = subprocess.run(["ldd", program], capture_output=True, text=True).stdout
        for lib in (w for w in libs.split() if w.startswith("/")):
            dest = root + lib
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy(lib, dest)
    subprocess.run([os.path.join(root, "bin", "busybox"), "--install",
                    os.path.join(root, "bin")], check=True)
    os.makedirs(os.path.join(root, "www"))
    with open(os.path.join(root, "www", "index.html"), "w") as f:
        f.write(page)
    subprocess.run(["tar", "-C", root, "-cf", tar, "."], check=True)
    os.chmod(tar, 0o644)
    shutil.rmtree(root)


def supervisor_pids(root: int) -> list[int]:
    """The supervisor's processes: `root` and its descendants that are rootlesskit /
    ours, not descending into dockerd, containerd, slirp4netns, ..."""
    children: dict[int, list[int]] = {}
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        argv = cmdline(pid)
        if not argv:
            continue
        names = [os.path.basename(a) for a in argv[:2]]
        if any(n in NOT_SUPERVISOR or n.startswith(("containerd", "dockerd")) for n in names):
            continue  # not ours to count, nor its children
        text = " ".join(argv[:2])
        if "rootlesskit" in text or "rootless" in text or argv[0] == "/proc/self/exe":
            found.append(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


def measure_port(user: User, env: dict, name: str, timeout: float = 30) -> dict:
    port = free_port()
    argv = [DOCKER, "run", "-d", "--name", name, "--stop-timeout", "1",
            "-p", f"127.0.0.1:{port}:80", IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]
    start = time.perf_counter()
    proc = user.popen(argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cli_done = None
    while True:
        if cli_done is None and proc.poll() is not None:
            cli_done = time.perf_counter() - start
            if proc.returncode != 0:
                out = proc.stdout.read().decode(errors="replace")
                user.live.remove(proc)
                raise Failed(f"docker run failed ({proc.returncode}): {out.strip()[-500:]}")
        if http_ok(port):
            answered = time.perf_counter() - start
            break
        if time.perf_counter() - start > timeout:
            raise Failed(f"no HTTP answer on 127.0.0.1:{port} within {timeout} s")
        time.sleep(POLL)
    proc.wait(timeout=60)
    if cli_done is None:
        cli_done = time.perf_counter() - start
    if proc in user.live:
        user.live.remove(proc)
    return {"port": port, "answer_s": answered, "docker_run_s": cli_done}


def notable_lines(log: str) -> list[str]:
    lines = []
    with open(log, errors="replace") as f:
        for line in f:
            line = line.rstrip()
            if line and NOTABLE.search(line):
                lines.append(line[:400])
    return lines


def one_side(user: User, side: str, path: str, tar: str, expect: str) -> dict:
    base = tempfile.mkdtemp(prefix=PREFIX)
    os.chmod(base, 0o755)
    home, runtime = os.path.join(base, "home"), os.path.join(base, "run")
    for d in (home, runtime):
        os.mkdir(d, 0o700)
        os.chown(d, user.uid, user.gid)
    env = {"HOME": home, "XDG_RUNTIME_DIR": runtime, "PATH": path,
           "DOCKER_HOST": f"unix://{runtime}/docker.sock"}
    log = os.path.join(base, "dockerd.log")
    sample = {"side": side}
    proc = None
    graceful = True
    try:
        with open(log, "w") as f:
            t0 = time.perf_counter()
            proc = user.popen([DOCKERD_ROOTLESS], env, stdout=f, stderr=subprocess.STDOUT)
        while True:
            if proc.poll() is not None:
                raise Failed(f"dockerd-rootless.sh ended with {proc.returncode}")
            code, _ = user.run([DOCKER, "info", "--format", "{{.ID}}"], env, timeout=10)
            if code == 0:
                sample["ready_s"] = time.perf_counter() - t0
                break
            if time.perf_counter() - t0 > 90:
                raise Failed("docker info did not answer within 90 s")
            time.sleep(0.1)
        user.note_userns(proc.pid)
        root_argv = cmdline(proc.pid)
        sample["supervisor_argv"] = root_argv[:3]
        if expect not in " ".join(root_argv[:2]):
            raise Failed(f"{side}: the supervisor is {root_argv[:2]}, expected {expect}")
        with open(tar, "rb") as f:
            code, out = user.run([DOCKER, "import", "-", IMAGE], env, timeout=120, stdin=f)
        if code != 0:
            raise Failed(f"docker import failed: {out.strip()[-500:]}")
        sample["first"] = measure_port(user, env, "web1")
        sample["warm"] = measure_port(user, env, "web2")
        pids = supervisor_pids(proc.pid)
        sample["supervisor"] = [{"pid": p, "argv": cmdline(p)[:4]} for p in pids]
        pss = rss = 0
        for pid in pids:
            p, r = memory(pid)
            pss, rss = pss + p, rss + r
        sample["pss"], sample["rss"] = pss, rss
        code, out = user.run([DOCKER, "rm", "-f", "web1", "web2"], env, timeout=60)
        if code != 0:
            sample.setdefault("problems", []).append(f"docker rm -f: {out.strip()[-300:]}")
    except Failed as exc:
        sample["error"] = str(exc)
    finally:
        if proc is not None:
            if proc.poll() is None and "error" in sample:
                try:  # containers live in sessions of their own: let dockerd end them
                    user.run([DOCKER, "rm", "-f", "web1", "web2"], env, timeout=60)
                except Failed:
                    pass
            graceful = kill_group(proc, grace=30)
            if proc in user.live:
                user.live.remove(proc)
            sample["exit"] = proc.returncode
            sample["graceful_stop"] = graceful
        if os.path.exists(log):
            sample["log"] = notable_lines(log)
            if "error" in sample:
                with open(log, errors="replace") as f:
                    sample["log_tail"] = f.read()[-3000:]
        subprocess.run(["rm", "-rf", base], check=False)
    return sample


def median(samples: list[dict], key) -> float | None:
    values = [key(s) for s in samples if "error" not in s]
    return statistics.median(values) if values else None


COLUMNS = [("first ms", lambda s: s["first"]["answer_s"] * 1e3, "{:9.1f}"),
           ("warm ms", lambda s: s["warm"]["answer_s"] * 1e3, "{:9.1f}"),
           ("PSS MiB", lambda s: s["pss"] / 2**20, "{:9.1f}"),
           ("RSS MiB", lambda s: s["rss"] / 2**20, "{:9.1f}"),
           ("up s", lambda s: s["ready_s"], "{:9.2f}")]


def table(results: dict[str, list[dict]]) -> str:
    width = max(len(s) for s in results) + 2
    head = f"{'side':{width}}{'n':>3} " + "".join(f"{c:>10}" for c, _, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    medians = {}
    for side, samples in results.items():
        ok = sum(1 for s in samples if "error" not in s)
        medians[side] = [median(samples, key) for _, key, _ in COLUMNS]
        cells = "".join(" " + (fmt.format(m) if m is not None else f"{'-':>9}")
                        for m, (_, _, fmt) in zip(medians[side], COLUMNS))
        lines.append(f"{side:{width}}{ok:>3} {cells}")
    base = medians["rootlesskit"]
    for side in results:
        if side == "rootlesskit":
            continue
        cells = "".join(" " + (f"{m / b:8.2f}x" if m is not None and b else f"{'-':>9}")
                        for m, b in zip(medians[side], base))
        lines.append(f"{side + ' / rlk':{width}}{'':>3} {cells}")
    return "\n".join(lines)


def _interrupt(*_):
    raise KeyboardInterrupt  # SIGTERM: clean up as after Ctrl-C


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ours", action="append", default=[], metavar="LABEL=VENV_BIN_DIR",
                    help="a build of ours to compare (repeatable)")
    ap.add_argument("--user", default="rlt-bench")
    ap.add_argument("--json", metavar="FILE", help="write the raw samples here")
    args = ap.parse_args(argv)
    if os.getuid() != 0:
        ap.error("run as root (it starts the user's dockerd through setpriv)")
    sides = {"rootlesskit": (BASE_PATH, "rootlesskit")}
    for item in args.ours:
        label, sep, bindir = item.partition("=")
        if not sep or not label or not os.path.isfile(os.path.join(bindir, "docker-rootlesskit")):
            ap.error(f"--ours {item}: want LABEL=DIR with DIR/docker-rootlesskit")
        bindir = os.path.abspath(bindir)
        sides[f"ours ({label})"] = (f"{bindir}:{BASE_PATH}",
                                    os.path.join(bindir, "docker-rootlesskit"))
    if len(sides) < 2:
        ap.error("give at least one --ours LABEL=VENV_BIN_DIR")
    for tool in (DOCKERD_ROOTLESS, DOCKER, "/usr/bin/rootlesskit"):
        if not os.path.exists(tool):
            ap.error(f"{tool} is missing (docker.io and rootlesskit packages)")

    user = User(args.user)
    others = user.processes()
    if others:  # not ours to stop; they add noise to the figures
        print(f"warning: {user.name} already runs {len(others)} processes (another "
              f"benchmark?); they are left alone:\n  " + "\n  ".join(o[:160] for o in others),
              file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)
    os.chmod("/dev/net/tun", 0o666)
    results: dict[str, list[dict]] = {side: [] for side in sides}
    imgdir = None
    all_graceful = True
    try:
        imgdir, tar = build_image_tar()
        names = list(sides)
        for rnd in range(args.rounds):
            for side in names:
                path, expect = sides[side]
                sample = one_side(user, side, path, tar, expect)
                sample["round"] = rnd
                results[side].append(sample)
                all_graceful &= sample.get("graceful_stop", True)
                if "error" in sample:
                    msg = f"error: {sample['error']}"
                else:
                    msg = (f"up {sample['ready_s']:.2f} s, first "
                           f"{sample['first']['answer_s'] * 1e3:.1f} ms (cli "
                           f"{sample['first']['docker_run_s'] * 1e3:.0f}), warm "
                           f"{sample['warm']['answer_s'] * 1e3:.1f} ms (cli "
                           f"{sample['warm']['docker_run_s'] * 1e3:.0f}), PSS "
                           f"{sample['pss'] / 2**20:.1f} MiB, RSS {sample['rss'] / 2**20:.1f} "
                           f"MiB in {len(sample['supervisor'])} procs")
                print(f"round {rnd + 1} {side:18} {msg}", file=sys.stderr, flush=True)
                left = user.mine()
                if left:
                    time.sleep(2)
                    left = user.describe(user.mine())
                if left:
                    sample.setdefault("problems", []).append(f"left running: {left}")
                    print(f"  left running: {left}", file=sys.stderr)
                    all_graceful = False
                    user.kill_mine()
                others = [p for p in user.processes()
                          if int(p.split()[0]) not in set(user.mine())]
                if others:
                    sample["other_processes_of_user"] = len(others)
                    print(f"  note: {len(others)} other processes of {user.name} are running "
                          f"(not this benchmark's): figures may be noisy", file=sys.stderr)
    finally:
        for proc in list(user.live):
            all_graceful &= kill_group(proc, grace=5)
        # Not `pkill -u`: the user may be running someone else's benchmark.
        if user.mine():
            time.sleep(0 if not all_graceful else 3)
            if left := user.mine():
                print(f"killing leftovers: {user.describe(left)}", file=sys.stderr)
                user.kill_mine()
        if imgdir:
            subprocess.run(["rm", "-rf", imgdir], check=False)
        for d in os.listdir("/tmp"):
            if d.startswith(PREFIX):
                subprocess.run(["rm", "-rf", os.path.join("/tmp", d)], check=False)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"sides": {s: sides[s][0] for s in sides}, "samples": results},
                          f, indent=1)

    print(table(results))
    seen = set()
    for side, samples in results.items():
        for s in samples:
            for line in s.get("log", []) + s.get("problems", []):
                # timestamps differ between rounds: dedupe on the text after them
                key = (side, re.sub(r'time="[^"]*"|/tmp/rlt-dbench-\w+|\b[0-9a-f]{32,}\b|'
                                    r'\b\d+\b', "", line))
                if key not in seen:
                    seen.add(key)
                    print(f"[{side}] {line}", file=sys.stderr)
    return 0 if all("error" not in s for v in results.values() for s in v) else 1


if __name__ == "__main__":
    sys.exit(main())
