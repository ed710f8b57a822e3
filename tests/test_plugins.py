"""Third-party drivers: one module, registered through the `rootless.network_drivers`
(or `rootless.port_drivers`) entry-point group, selected with --net=NAME (or
--port-driver=NAME)."""
import os
import shutil
import textwrap
import uuid

import pytest


DRIVER = '''
import os

from rootless.drivers.network.none import NoneDriver
from rootless.drivers.port.none import NoPortDriver


class MarkerDriver(NoneDriver):
    """A netns with lo up (as none), and a marker file proving it ran in the child."""

    name = "marker"

    @staticmethod
    def configure_child(info):
        NoneDriver.configure_child(info)
        with open(os.environ["MARKER_FILE"], "w") as f:
            f.write(str(os.getuid()))


class MarkerPortDriver(NoPortDriver):
    """As none, and a marker file proving its child side ran in the child."""

    name = "marker-ports"

    @staticmethod
    def start_child(config, state_dir, netns):
        with open(os.environ["MARKER_FILE"], "w") as f:
            f.write(f"ports {os.getuid()}")
'''


@pytest.fixture
def plugin_dir(user):
    path = f"/tmp/rlt-plugin-{uuid.uuid4().hex[:8]}"
    dist = os.path.join(path, "rlt_marker_driver-1.0.dist-info")
    os.makedirs(dist)
    with open(os.path.join(path, "rlt_marker_driver.py"), "w") as f:
        f.write(DRIVER)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: rlt-marker-driver\nVersion: 1.0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write(textwrap.dedent("""\
            [rootless.network_drivers]
            marker = rlt_marker_driver:MarkerDriver
            [rootless.port_drivers]
            marker-ports = rlt_marker_driver:MarkerPortDriver
            """))
    os.system(f"chmod -R a+rX {path}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_entry_point_driver_is_used(user, rootless_run, plugin_dir):
    marker = f"/tmp/rlt-marker-{uuid.uuid4().hex[:8]}"
    try:
        r = user.run([rootless_run, "--net=marker", "--", "cat", "/sys/class/net/lo/flags"],
                     env={"PYTHONPATH": plugin_dir, "MARKER_FILE": marker})
        assert r.returncode == 0, r.stderr
        assert int(r.stdout, 16) & 1, "lo is not up"  # IFF_UP
        assert r.stderr == ""
        with open(marker) as f:
            assert f.read() == "0"  # written inside the namespace, as its root
    finally:
        if os.path.exists(marker):
            os.unlink(marker)


def test_entry_point_port_driver_is_used(user, rootless_run, plugin_dir):
    """--port-driver takes a plugin's name too (it used to refuse any name but ours)."""
    marker = f"/tmp/rlt-marker-{uuid.uuid4().hex[:8]}"
    try:
        r = user.run([rootless_run, "--net=none", "--port-driver=marker-ports", "--", "true"],
                     env={"PYTHONPATH": plugin_dir, "MARKER_FILE": marker})
        assert (r.returncode, r.stderr) == (0, "")
        with open(marker) as f:
            assert f.read() == "ports 0"  # written inside the namespace, as its root
    finally:
        if os.path.exists(marker):
            os.unlink(marker)


@pytest.mark.parametrize("flag,choices", [
    ("--net", "auto, host, none, slirp4netns, pasta, lxc-user-nic, marker"),
    ("--port-driver", "auto, none, builtin, slirp4netns, implicit, marker-ports"),
])
def test_unknown_driver_names_the_choices(user, rootless_run, plugin_dir, flag, choices):
    """Every name the flag takes: auto, ours, and the installed plugins'."""
    r = user.run([rootless_run, f"{flag}=nosuch", "--", "true"],
                 env={"PYTHONPATH": plugin_dir})
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and f"{flag}=nosuch" in lines[0], r.stderr
    assert lines[0].endswith(f"choose one of {choices}"), r.stderr
    assert "Traceback" not in r.stderr
