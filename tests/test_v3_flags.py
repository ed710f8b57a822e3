"""rootlesskit v3's flags (issue 18): --print-semver, every --propagation rootlesskit's
child accepts, --vpnkit-binary, and one line for the network drivers not available here.

The propagation tests run rootless-run as the test user inside a mount namespace of
their own, made by root with / shared (as on a systemd host; the machine's own / is
private), and look at what crosses between it and the child's mount namespace."""
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest

from rootless import cli
from test_cli import assert_one_line_error, has_flag
from test_core import Lines

SEMVER = ("major", "minor", "patch")


# -- --print-semver -------------------------------------------------------------------------

def our_semver() -> dict[str, int]:
    import rootless
    numbers = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", rootless.__version__).groups()
    return {name: int(n or 0) for name, n in zip(SEMVER, numbers)}


@pytest.fixture(params=["rootless-run", "rootlesskit"])
def program(request, rootless_run):
    """rootless-run under its own name and under rootlesskit's."""
    if request.param == "rootless-run":
        return rootless_run
    return request.getfixturevalue("rootlesskit_link")


@pytest.mark.parametrize("spelling", ["=", " "], ids=["equals", "separate"])
@pytest.mark.parametrize("component", SEMVER)
def test_print_semver_prints_the_component_and_runs_nothing(user, program, user_tmp,
                                                           component, spelling):
    flag = [f"--print-semver={component}"] if spelling == "=" else ["--print-semver", component]
    r = user.run([program, *flag, "--", "touch", os.path.join(user_tmp, "ran")],
                 env={"TMPDIR": user_tmp})
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{our_semver()[component]}\n", "")
    assert os.listdir(user_tmp) == [], "the command ran, or a state dir was made"


def test_print_semver_needs_no_command(user, rootless_run):
    """As rootlesskit's: it prints before it looks for a command (or at other flags'
    combinations, here --reaper=true without --pidns)."""
    r = user.run([rootless_run, "--reaper=true", "--print-semver=minor"])
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{our_semver()['minor']}\n", "")


@pytest.mark.parametrize("value", ["bogus", "MAJOR", "1", "major,minor"])
def test_print_semver_bad_value_is_one_line(user, program, user_tmp, value):
    """rootlesskit v3: `expected --print-semver=(major|minor|patch), got "bogus"`, exit 1."""
    r = user.run([program, f"--print-semver={value}", "--", "touch",
                  os.path.join(user_tmp, "ran")], env={"TMPDIR": user_tmp})
    assert_one_line_error(r, f"--print-semver={value}", "major, minor or patch")
    assert os.listdir(user_tmp) == []


def test_print_semver_empty_is_not_given(user, rootless_run):
    """rootlesskit reads an empty --print-semver= as no flag, and runs the command."""
    r = user.run([rootless_run, "--net=host", "--print-semver=", "--", "echo", "ran"])
    assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr


@pytest.mark.parametrize("version,numbers", [
    ("0.1.0", (0, 1, 0)), ("1.2.3.dev4", (1, 2, 3)), ("2.0rc1", (2, 0, 0)), ("3", (3, 0, 0)),
    ("4.5+local.7", (4, 5, 0)), ("10.20.30", (10, 20, 30))])
def test_version_component_reads_the_release(monkeypatch, version, numbers):
    """Versions we may have one day (PEP 440), not only today's."""
    monkeypatch.setattr(cli, "__version__", version)
    assert tuple(cli.version_component(name) for name in SEMVER) == numbers


# -- network drivers rootlesskit has and we do not ---------------------------------------------

@pytest.mark.parametrize("driver,why", [("vpnkit", "Debian does not package"),
                                        ("gvisor-tap-vsock", "Go library")])
def test_unavailable_network_driver_says_why_and_what_instead(user, program, user_tmp,
                                                              driver, why):
    r = user.run([program, f"--net={driver}", "--", "touch", os.path.join(user_tmp, "ran")],
                 env={"TMPDIR": user_tmp})
    assert_one_line_error(r, f"--net={driver} is not available", why, "--net=slirp4netns",
                          "Gbit/s", "--net=pasta")
    assert os.listdir(user_tmp) == []


def test_vpnkit_binary_is_accepted(user, program):
    """rootlesskit's scripts may pass it whatever the driver (rootlesskit reads it only
    with --net=vpnkit)."""
    r = user.run([program, "--vpnkit-binary=/nonexistent/vpnkit", "--", "echo", "ran"])
    assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr


def test_help_lists_the_new_values(user, program):
    r = user.run([program, "--help"])
    assert r.returncode == 0, r.stderr
    assert has_flag(r.stdout, "--vpnkit-binary")
    assert "--print-semver {major|minor|patch}" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("--propagation"))
    assert set(line.split("{")[1].rstrip("}").split("|")) == set(PROPAGATION)


# -- --propagation ------------------------------------------------------------------------------

# Answers one command a line on stdin, inside the child (as its root): what is mounted
# where, and what the kernel lets it do. `nest` forks a process into a new mount
# namespace of the same user namespace (as a container runtime would), `nested CMD ARG`
# asks it.
PROBE = r'''
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND, MNT_DETACH, CLONE_NEWNS = 32, 4096, 2, 0x20000

def result(rc):
    return "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]

def tags(path):
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                found = " ".join(fields[6:fields.index("-")]) or "-"
    return found

def answer(cmd, arg):
    if cmd == "tags":
        return tags(arg) or "none"
    if cmd == "mounted":
        return "no" if tags(arg) is None else "yes"
    if cmd == "exists":
        return "yes" if os.path.exists(arg) else "no"
    if cmd == "list":
        return " ".join(sorted(os.listdir(arg)))
    if cmd == "write":
        try:
            open(arg, "w").close()
            return "ok"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    if cmd == "mount":
        return result(libc.mount(b"rlt-inside", arg.encode(), b"tmpfs", 0, None))
    if cmd == "umount":
        return result(libc.umount2(arg.encode(), MNT_DETACH))
    if cmd == "remount-rw":
        return result(libc.mount(None, arg.encode(), None, MS_REMOUNT | MS_BIND, None))
    return "unknown " + cmd

def nest():
    ask_r, ask_w = os.pipe()
    tell_r, tell_w = os.pipe()
    if os.fork() == 0:
        os.close(ask_w)
        os.close(tell_r)
        out = os.fdopen(tell_w, "w")
        out.write(result(libc.unshare(CLONE_NEWNS)) + "\n")
        out.flush()
        serve(os.fdopen(ask_r), out)
        os._exit(0)
    os.close(ask_r)
    os.close(tell_w)
    return os.fdopen(ask_w, "w"), os.fdopen(tell_r)

def serve(lines, out):
    nested = None
    for line in lines:
        cmd, _, arg = line.rstrip("\n").partition(" ")
        if cmd == "nest":
            nested = nest()
            reply = nested[1].readline().strip()
        elif cmd == "nested":
            nested[0].write(arg + "\n")
            nested[0].flush()
            reply = nested[1].readline().strip()
        else:
            reply = answer(cmd, arg)
        out.write(reply + "\n")
        out.flush()

print("ready", flush=True)
serve(sys.stdin, sys.stdout)
'''

# The mount namespace the test makes (see MountNs): / and `sub`, a tmpfs below it, are
# shared. In the child's namespace, owned by a new user namespace, the kernel makes
# them slaves of these (mount_namespaces(7), "Restrictions", [2]); --propagation then
# applies to / alone or, with the r, to every mount.
PROPAGATION = {  # mode: the peer groups of / and of sub inside, in mountinfo's words
    "rprivate": ("", ""),
    "private": ("", "master"),  # sub stays the slave it was
    "rslave": ("master", "master"),
    # The same as rslave: every mount is already a slave (or private, which MS_SLAVE
    # leaves private), so making / alone one changes nothing that can be seen.
    "slave": ("master", "master"),
    "rshared": ("shared master", "shared master"),
    "shared": ("shared master", "master"),
}


class MountNs:
    """A mount namespace of the test's own, with / shared. Under `base` (a new dir of
    the host's file system): `sub`, a shared tmpfs with the mount points `after` and
    `inside`; `stage`, a read-only tmpfs with a tmpfs at `stage/inner` (each with a file
    `marker`), which the test binds in after the start, as one unit; the mount points
    `direct` and `inside`, on / itself."""

    def __init__(self):
        self.base = f"/tmp/rlt-v3-{uuid.uuid4().hex[:8]}"
        self.holder = None

    def open(self) -> None:
        for sub in ("", "/sub", "/stage", "/direct", "/inside"):
            os.mkdir(self.base + sub, 0o755)
        # The namespace lives as long as this process: killed with the test, or with
        # pytest (parent-death signal).
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "shared", "setpriv", "--pdeathsig", "KILL",
             "--", "sh", "-c", "echo ready; exec sleep infinity"], stdout=subprocess.PIPE,
            text=True)
        assert self.holder.stdout.readline() == "ready\n"
        self.outer = ("nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt")
        b = self.base
        self.root(f"mount -t tmpfs -o mode=755 rlt-sub {b}/sub; "
                  f"mkdir -m 755 {b}/sub/after {b}/sub/inside; "
                  f"mount -t tmpfs -o mode=755 rlt-stage {b}/stage; "
                  f"mkdir -m 755 {b}/stage/inner; touch {b}/stage/marker; "
                  f"mount -t tmpfs -o mode=755 rlt-inner {b}/stage/inner; "
                  f"touch {b}/stage/inner/marker; mount -o remount,bind,ro {b}/stage")

    def root(self, script: str) -> None:
        """Run `script` as root in this namespace (the host's side)."""
        subprocess.run([*self.outer, "sh", "-ec", script], check=True)

    def tags(self) -> dict[str, str]:
        """Mount point -> optional fields of its mountinfo line, on the host's side."""
        points = {}
        with open(f"/proc/{self.holder.pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                points[fields[4]] = " ".join(fields[6:fields.index("-")])
        return points

    def close(self) -> None:
        """Its mounts go with the namespace; the dirs are the host's."""
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
            self.holder.stdout.close()
        if os.path.isdir(self.base):
            shutil.rmtree(self.base)


@pytest.fixture
def mount_ns():
    ns = MountNs()
    try:
        ns.open()
        yield ns
    finally:
        ns.close()


class Probe:
    """PROBE run by rootless-run as the test user, inside `ns`."""

    def __init__(self, start, rootless_run, ns: MountNs, mode: str):
        # --net=none: a fresh sysfs, and rootless-run's default copy-ups of /etc and
        # /run: the steps that move mounts, which a shared / would refuse.
        self.proc = start([rootless_run, "--net=none", f"--propagation={mode}", "--",
                           sys.executable, "-c", PROBE], outer=ns.outer, stdin=subprocess.PIPE)
        self.lines = Lines(self.proc.stdout)
        first = self.lines.next(timeout=20)
        assert first == "ready", (first, self.proc.stderr.read() if first is None else "")

    def __call__(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.lines.next()

    def groups(self, path: str) -> dict[str, str]:
        """{"shared": id, "master": id} of the mount at `path` inside."""
        return dict(tag.split(":") for tag in self(f"tags {path}").split() if ":" in tag)

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=15) == 0, self.proc.stderr.read()


def _group(tags: str) -> str:
    """The peer group of a mount that is shared on the host's side."""
    return re.search(r"shared:(\d+)", tags).group(1)


@pytest.mark.parametrize("mode", PROPAGATION)
def test_propagation_of_root_and_of_mounts_below(user, rootless_run, mount_ns, start, mode):
    """mountinfo inside: / (and, with the r, the other mounts) as --propagation says;
    a slave's master is the host's peer group, a shared mount is in a group of the
    child's own."""
    probe = Probe(start, rootless_run, mount_ns, mode)
    host = mount_ns.tags()
    for path, kinds in zip(("/", f"{mount_ns.base}/sub"), PROPAGATION[mode]):
        groups = probe.groups(path)
        assert sorted(groups) == sorted(kinds.split()), (path, groups)
        if "master" in groups:
            assert groups["master"] == _group(host[path]), (path, groups, host[path])
        if "shared" in groups:
            assert groups["shared"] != _group(host[path])
    assert probe("write /etc/rlt-probe") == "ok", "the copy-up of /etc is not writable"
    assert probe("list /sys/class/net") == "lo", "not the netns' own sysfs"
    probe.close()


@pytest.mark.parametrize("mode", ["shared", "rshared"])
def test_shared_with_copy_ups_alone(user, rootless_run, mount_ns, user_tmp, mode):
    """The copy-ups move a mount too (no sysfs here, with --net=host). rootlesskit
    refuses --propagation=rshared with --copy-up; we make / shared after them."""
    r = user.run([rootless_run, "--net=host", f"--propagation={mode}", "--copy-up=/etc",
                  "--copy-up=/run", "--", "sh", "-c",
                  "touch /etc/rlt-probe /run/rlt-probe && grep ' / / ' /proc/self/mountinfo"],
                 env={"TMPDIR": user_tmp}, outer=mount_ns.outer)
    assert r.returncode == 0, r.stderr
    assert " shared:" in r.stdout, r.stdout


# mode: a mount the host's side makes after the start shows inside: on / itself, on sub
SEEN_FROM_THE_HOST = {"rprivate": (False, False), "private": (False, True),
                      "rslave": (True, True), "slave": (True, True),
                      "rshared": (True, True), "shared": (True, True)}


@pytest.mark.parametrize("mode", PROPAGATION)
def test_host_mounts_after_the_start(user, rootless_run, mount_ns, start, mode):
    """A mount made on the host's side after the start shows inside as far as the
    propagation reaches (private: / is private, sub still a slave); where it shows,
    the kernel locks what came in (mount_namespaces(7), [3]-[5]): its read-only flag
    (EPERM), and a part of a tree that came as one unit (EINVAL), while the unit as a
    whole may go. The namespace's own inherited mounts are locked from the start."""
    probe = Probe(start, rootless_run, mount_ns, mode)
    b = mount_ns.base
    assert probe(f"umount {b}/sub") == "EINVAL", "an inherited mount was not locked"
    mount_ns.root(f"mount -t tmpfs rlt-direct {b}/direct; touch {b}/direct/marker; "
                  f"mount --rbind {b}/stage {b}/sub/after")
    on_root, on_sub = SEEN_FROM_THE_HOST[mode]
    assert probe(f"exists {b}/direct/marker") == ("yes" if on_root else "no")
    assert probe(f"exists {b}/sub/after/inner/marker") == ("yes" if on_sub else "no")
    if on_sub:
        assert probe(f"remount-rw {b}/sub/after") == "EPERM"
        assert probe(f"umount {b}/sub/after/inner") == "EINVAL"
        assert probe(f"umount {b}/sub/after") == "ok"
        assert probe(f"mounted {b}/sub/after") == "no"
        assert f"{b}/sub/after" in mount_ns.tags(), "unmounted on the host's side too"
    probe.close()


# mode: a nested mount namespace of the command sees the command's later mounts on / ,
# on sub (the shared ones inside; nothing ever goes out to the host's side)
SEEN_BY_A_NESTED_NAMESPACE = {"rprivate": (False, False), "private": (False, False),
                              "rslave": (False, False), "slave": (False, False),
                              "rshared": (True, True), "shared": (True, False)}


@pytest.mark.parametrize("mode", PROPAGATION)
def test_mounts_made_inside(user, rootless_run, mount_ns, start, mode):
    """A mount made inside never reaches the host's side (the child's mounts are at
    most slaves of it: mount_namespaces(7), [2]), for rshared too; it reaches a mount
    namespace the command makes later where the mount below it is shared: / for shared,
    every mount for rshared."""
    probe = Probe(start, rootless_run, mount_ns, mode)
    b = mount_ns.base
    assert probe("nest") == "ok"
    assert probe(f"mount {b}/inside") == "ok"
    assert probe(f"mount {b}/sub/inside") == "ok"
    host = mount_ns.tags()
    assert f"{b}/inside" not in host and f"{b}/sub/inside" not in host, "went out to the host"
    on_root, on_sub = SEEN_BY_A_NESTED_NAMESPACE[mode]
    assert probe(f"nested mounted {b}/inside") == ("yes" if on_root else "no")
    assert probe(f"nested mounted {b}/sub/inside") == ("yes" if on_sub else "no")
    # what the command mounted is its own to unmount
    assert probe(f"umount {b}/inside") == "ok"
    assert probe(f"umount {b}/sub/inside") == "ok"
    probe.close()
