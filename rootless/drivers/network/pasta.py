"""pasta (from passt): user-mode networking that also forwards ports by itself.

pasta daemonizes once the namespace is configured, so its first process exiting
with 0 is the readiness signal; the daemon's pid comes from its pid file, and a pidfd
is opened on it at once: the daemon is no child of ours, so its pid may be reused as
soon as it exits, and only the pidfd still names it then.
"""
import os
import _signal as signal  # the C module: see _process.py

from ..._process import readable
from ...errors import DriverError
from ._helper import Helper, Watchdog, capture_output, ended, helper_failed, spawn
from .base import HelperDriver

_START_TIMEOUT = 10.0


class PastaDriver(HelperDriver):
    name = "pasta"
    binary_flag = "--pasta-binary"
    package = "passt"
    _watchdog = None

    def forward_options(self) -> list[str]:
        """pasta's -t/-u/-T/-U options: the implicit port driver's, else no forwarding
        at all (other port drivers forward by themselves)."""
        if self.config.port_driver == "implicit":
            from ..port.implicit import pasta_options
            return pasta_options(self.config)
        return ["-t", "none", "-u", "none", "-T", "none", "-U", "none"]

    def argv(self, child_pid: int, pidfile: str, netns_path: str | None) -> list[str]:
        a, c = self.addressing, self.config
        # Older passt (Debian 12's 2023-03) lacks some flags: probe, don't assume.
        known = capture_output([self.binary, "--help"])
        argv = [self.binary, "--config-net", "--ns-ifname", c.ifname, "--mtu", str(self.mtu),
                "--address", a.child, "--netmask", str(a.prefixlen), "--gateway", a.gateway,
                "--dns-forward", a.dns, "--pid", pidfile, "--quiet",
                *self.forward_options()]
        if c.disable_host_loopback:
            argv.append("--no-map-gw")
        elif "--host-lo-to-ns-lo" in known:
            argv.append("--host-lo-to-ns-lo")
        if not c.ipv6:
            argv.append("--ipv4-only")
        if netns_path:
            return argv + ["--userns", f"/proc/{child_pid}/ns/user", "--netns", netns_path]
        return argv + [str(child_pid)]

    def start(self, child_pid: int, state_dir: str, netns_path: str | None = None):
        log = os.path.join(state_dir, "pasta.log")
        pidfile = os.path.join(state_dir, "pasta.pid")
        starter = spawn(self.argv(child_pid, pidfile, netns_path), log)
        status = _wait_with_timeout(starter, _START_TIMEOUT)
        if status is None:
            os.kill(starter, signal.SIGKILL)
            os.waitpid(starter, 0)
            raise helper_failed("pasta", f"did not configure the network within "
                                f"{_START_TIMEOUT:.0f} s", log)
        if status != 0:
            raise helper_failed("pasta", f"{ended(status)} before the network was up", log)
        try:
            with open(pidfile) as f:
                daemon = int(f.read().strip())
        except (OSError, ValueError) as exc:
            raise DriverError(f"pasta started but its pid file {pidfile} is unusable: {exc}"
                              ) from None
        self.helper = Helper("pasta", daemon, log, reapable=False)
        self._watchdog = Watchdog(self.helper.fd)
        return self.info()

    def stop(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
            self._watchdog = None
        if self.helper:
            # SIGKILL, as slirp4netns: the namespace it served is going, nothing is lost,
            # and a stopped pasta (SIGSTOP, a debugger) would never act on a SIGTERM.
            self.helper.signal(signal.SIGKILL)
            self.helper.close()
            self.helper = None


def _wait_with_timeout(pid: int, timeout: float) -> int | None:
    """waitpid with a deadline, through a pidfd."""
    fd = os.pidfd_open(pid)
    try:
        if not readable(fd, timeout):
            return None
    finally:
        os.close(fd)
    return os.waitpid(pid, 0)[1]
