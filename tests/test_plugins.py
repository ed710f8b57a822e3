"""Third-party network drivers: one module, registered through the
`rootless.network_drivers` entry-point group, selected with --net=NAME."""
import os
import shutil
import textwrap
import uuid

import pytest


DRIVER = '''
import os

from rootless.drivers.network.none import NoneDriver


class MarkerDriver(NoneDriver):
    """A netns with lo up (as none), and a marker file proving it ran in the child."""

    name = "marker"

    @staticmethod
    def configure_child(info):
        NoneDriver.configure_child(info)
        with open(os.environ["MARKER_FILE"], "w") as f:
            f.write(str(os.getuid()))
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


def test_unknown_driver_names_the_choices(user, rootless_run, plugin_dir):
    r = user.run([rootless_run, "--net=nosuch", "--", "true"],
                 env={"PYTHONPATH": plugin_dir})
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "--net=nosuch" in lines[0] and "slirp4netns" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
