"""The command line: help, version, program names, import hygiene, and every kind of
bad input ending in exit status 1 with one line on stderr and nothing left behind."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import free_port

# Every flag of the contract (COMPAT.md, "Command line").
COMPAT_FLAGS = [
    "--debug", "--state-dir", "--net", "--slirp4netns-binary", "--pasta-binary",
    "--slirp4netns-sandbox", "--slirp4netns-seccomp", "--mtu", "--cidr", "--ifname",
    "--disable-host-loopback", "--ipv6", "--copy-up", "--copy-up-mode", "--propagation",
    "--port-driver", "-p", "--publish", "--source-ip-transparent", "--pidns", "--cgroupns",
    "--utsns", "--ipcns", "--detach-netns", "--reaper", "--evacuate-cgroup2",
    "--subid-source", "-v", "--version", "-h", "--help",
]


def has_flag(text: str, flag: str) -> bool:
    # whole flag only: --net must not be found inside --detach-netns
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert r.stdout == ""
    return lines[0]


# -- help, version, names -------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_flag(user, rootless_run, flag):
    r = user.run([rootless_run, flag])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: rootless-run ")
    missing = [f for f in COMPAT_FLAGS if not has_flag(r.stdout, f)]
    assert not missing, f"--help does not mention {missing}"


def test_version(user, rootless_run):
    r = user.run([rootless_run, "--version"])
    assert r.returncode == 0, r.stderr
    assert re.match(r"rootless-run version \d+\.\d+", r.stdout), r.stdout




def test_invoked_as_rootlesskit_runs(user, rootlesskit_link):
    r = user.run([rootlesskit_link, "--", "id", "-u"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "0\n"


def test_invoked_as_rootlesskit_help(user, rootlesskit_link):
    r = user.run([rootlesskit_link, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: rootlesskit ")


def test_docker_rootlesskit_script(user):
    script = os.path.join(os.path.dirname(sys.executable), "docker-rootlesskit")
    r = user.run([script, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: docker-rootlesskit ")


@pytest.mark.parametrize("program", ["rootless-run", "rootlesskit"])
def test_help_shows_defaults_as_typed(user, rootless_run, rootlesskit_link, program):
    """Every "(default: X)" of --help is what the user types (true, not True; each
    --copy-up on its own, not a Python tuple), and typing it changes nothing."""
    from rootless.cli import build_config

    r = user.run([rootless_run if program == "rootless-run" else rootlesskit_link, "--help"])
    assert r.returncode == 0, r.stderr
    shown = re.findall(r"^  (?:-\w, )?(--[\w-]+).*\n {6}.*\(default: (.*)\)$", r.stdout, re.M)
    assert len(shown) >= 10, r.stdout
    if program == "rootless-run":
        assert ("--disable-host-loopback", "true") in shown
        assert ("--copy-up", "--copy-up=/etc --copy-up=/run") in shown
    command = ["--", "true"]
    unflagged = repr(build_config(program, command))
    for flag, default in shown:
        assert not re.search(r"True|False|[()'\[\]]", default), (flag, default)
        typed = default.split() if default.startswith("-") else [f"{flag}={default}"]
        assert repr(build_config(program, typed + command)) == unflagged, (flag, default)


# -- import hygiene -------------------------------------------------------------------

@pytest.mark.parametrize("modules,absent", [
    ("rootless.child.run, rootless.cli, rootless.parent.run, rootless.wire.messages", ["trio"]),
    # enum (signal.py's wrappers, re) is 1.5-2 ms of every start: see _process.py
    ("rootless.cli, rootless.parent.run, rootless.child.run", ["trio", "msgspec", "enum", "re"]),
], ids=["no-trio", "fast-path"])
def test_import_hygiene(modules, absent):
    code = f"import sys, {modules}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported by {modules}: {r.stdout.strip()}"


@pytest.mark.parametrize("net,port_driver", [
    ("slirp4netns", "builtin"), ("slirp4netns", "slirp4netns"), ("pasta", "implicit")])
def test_publishing_loads_no_msgspec_before_the_fork(net, port_driver):
    """What the parent does with -p before the fork (parse, check, bind the builtin
    driver's ports) loads no msgspec: the child would share it (3 MiB), and it would
    delay the command (10-16 ms). tests/test_ports.py checks a whole run, as the user."""
    port = free_port()
    code = ("import sys; from rootless.cli import build_config; "
            "from rootless.drivers import port; "
            f"config = build_config('rootless-run', ['--net={net}', "
            f"'--port-driver={port_driver}', '-p', '127.0.0.1:{port}:80/tcp', '--', 'true']); "
            "ports = port.get(config.port_driver)(config); ports.preflight(); "
            "ports.link_child(); bound = ports.listen_early() or (); ports.close_early(); "
            "print(len(bound), sorted(m for m in sys.modules "
            "if m.startswith(('msgspec', 'rootless.portspec'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    bound = 1 if port_driver == "builtin" else 0  # the others' helper binds
    assert r.stdout.strip() == f"{bound} ['rootless.portspec']", r.stdout


@pytest.mark.parametrize("script,argv", [
    ("rootless-run", ["--net=host", "--", "true"]),
    ("docker-rootlesskit", ["--", "true"]),
    ("rootless-ctl", ["enter", "--state-dir", "/nonexistent"]),
])
def test_installed_commands_load_no_enum_nor_re(user, script, argv):
    """The installed commands themselves, as the user runs them: pip's generated
    launchers import re (and enum) before any of our code; ours do not."""
    path = os.path.join(os.path.dirname(sys.executable), script)
    r = user.run([path, *argv], env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert "rootless" in imported, r.stderr  # the profile is there: the check can fail
    assert not imported & {"enum", "re"}, sorted(imported & {"enum", "re"})


# -- bad input ------------------------------------------------------------------------

BAD_INPUT = [  # (arguments, what the error line must name)
    (["--bogus"], ["--bogus"]),
    (["--net=vpnkit"], ["--net=vpnkit", "not available", "slirp4netns"]),
    (["--net=slirp4netns", "--port-driver=implicit"], ["--port-driver=implicit", "--net=pasta"]),
    (["-p", "127.0.0.1:18080:80/sctp"], ["sctp", "not supported", "builtin"]),
    (["--net=host", "-p", "127.0.0.1:18080:80/tcp"], ["--port-driver=builtin"]),
    (["-p", "127.0.0.1:99999:80/tcp"], ["99999"]),
    (["--mtu=99999"], ["--mtu=99999"]),
    (["--propagation=bogus"], ["--propagation=bogus", "rslave"]),
    # every driver the flag takes, auto included
    (["--net=bogus"], ["--net=bogus", "auto, host, none, slirp4netns, pasta, lxc-user-nic"]),
    (["--port-driver=bogus"],
     ["--port-driver=bogus", "auto, none, builtin, slirp4netns, implicit"]),
    (["--state-dir=/root/x"], ["/root/x"]),
    (["--reaper=true"], ["--reaper=true", "--pidns"]),
    (["--evacuate-cgroup2=x"], ["--evacuate-cgroup2", "--pidns", "--cgroupns"]),
]


def _choice_flags() -> list:
    from rootless._flags import FLAGS
    return [pytest.param(f.names[-1], f.choices, id=f.names[-1]) for f in FLAGS if f.choices]


@pytest.mark.parametrize("flag,choices", _choice_flags())
def test_a_bad_choice_lists_every_choice(user, rootless_run, flag, choices):
    r = user.run([rootless_run, f"{flag}=bogus", "--", "echo", "ran"])
    assert_one_line_error(r, f"{flag}=bogus", ", ".join(choices))


@pytest.mark.parametrize("args,needles", [pytest.param(a, n, id=" ".join(a)) for a, n in BAD_INPUT])
def test_bad_input_one_line(user, rootless_run, user_tmp, args, needles):
    r = user.run([rootless_run, *args, "--", "echo", "ran"], env={"TMPDIR": user_tmp})
    assert_one_line_error(r, *needles)
    assert os.listdir(user_tmp) == [], "a temp state dir was left behind"


@pytest.mark.parametrize("name", ["/sys/fs/cgroup/x", "..", "../../x", ".", "a/b", "",
                                  "a\nb", "a\x01b", "x" * 256])
def test_evacuate_cgroup2_takes_one_name(user, rootless_run, user_tmp, name):
    """A path or '..' would write outside our cgroup (on a cgroup v2 host: here, v1,
    it used to fail later, on the missing v2, without a word on the name)."""
    r = user.run([rootless_run, f"--evacuate-cgroup2={name}", "--pidns", "--cgroupns",
                  "--", "echo", "ran"], env={"TMPDIR": user_tmp})
    assert_one_line_error(r, "--evacuate-cgroup2=", "name of one sub-group",
                          "--evacuate-cgroup2=init")
    assert os.listdir(user_tmp) == []


def test_evacuate_cgroup2_needs_cgroup_v2(user, rootless_run, user_tmp):
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4] == "/sys/fs/cgroup" and " - cgroup2 " in line for line in f):
            pytest.skip("cgroup v2 is mounted at /sys/fs/cgroup: the v1 error cannot happen")
    r = user.run([rootless_run, "--evacuate-cgroup2=x", "--pidns", "--cgroupns", "--",
                  "echo", "ran"], env={"TMPDIR": user_tmp})
    assert_one_line_error(r, "cgroup v2")
    assert os.listdir(user_tmp) == []


def test_malformed_subuid_line(user, rootless_run, user_tmp, subid_files):
    subid_files(f"other:1:x:y\n{user.name}:100000:abc\n")
    r = user.run([rootless_run, "--", "echo", "ran"], env={"TMPDIR": user_tmp})
    assert_one_line_error(r, "/etc/subuid", "line 2", f"{user.name}:100000:abc")
    assert os.listdir(user_tmp) == []


@pytest.fixture
def path_without(user):
    """`make(*missing)`: a PATH of the venv plus a dir of symlinks to the usual tools,
    minus the `missing` ones."""
    directory = tempfile.mkdtemp(prefix="rlt-fakebin-")
    os.chmod(directory, 0o755)
    # setpriv too: the harness runs it from the same PATH
    tools = ["setpriv", "sh", "id", "cat", "echo", "true", "newuidmap", "newgidmap", "getsubids"]

    def make(*missing: str) -> str:
        for tool in tools:
            if tool not in missing:
                os.symlink(shutil.which(tool), os.path.join(directory, tool))
        return f"{os.path.dirname(sys.executable)}:{directory}"

    yield make
    shutil.rmtree(directory)


def test_missing_newuidmap(user, rootless_run, user_tmp, path_without):
    r = user.run([rootless_run, "--", "echo", "ran"],
                 env={"PATH": path_without("newuidmap"), "TMPDIR": user_tmp})
    assert_one_line_error(r, "newuidmap", "uidmap package")
    assert os.listdir(user_tmp) == []


def test_dynamic_subids_need_getsubids(user, rootless_run, user_tmp, path_without):
    path = path_without("getsubids")
    ok = user.run([rootless_run, "--subid-source=static", "--", "id", "-u"],
                  env={"PATH": path, "TMPDIR": user_tmp})
    assert (ok.returncode, ok.stdout) == (0, "0\n"), ok.stderr
    r = user.run([rootless_run, "--subid-source=dynamic", "--", "echo", "ran"],
                 env={"PATH": path, "TMPDIR": user_tmp})
    assert_one_line_error(r, "getsubids", "uidmap")
    assert os.listdir(user_tmp) == []


def test_command_not_found(user, rootless_run, user_tmp):
    r = user.run([rootless_run, "--", "rlt-no-such-command"], env={"TMPDIR": user_tmp})
    assert r.returncode == 127, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "rlt-no-such-command" in lines[0], r.stderr
    assert os.listdir(user_tmp) == []
