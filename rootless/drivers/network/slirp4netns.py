"""slirp4netns: user-mode TCP/IP for the child's netns, as rootlesskit drives it."""
import os
import _signal as signal  # the C module: see _process.py

from ..._paths import which
from ..._process import readable
from ...errors import UsageError
from ._helper import Helper, capture_output, helper_failed, spawn
from .base import HelperDriver

_READY_TIMEOUT = 10.0
_EXITING = 1.0  # s: a helper whose pipe closed unanswered has this long to be gone
# libslirp (4.7.0 here) does not scale TCP windows: 65535 bytes at most are in flight
# between it and the child, either way. At MTU 65520, Linux sends it segments of half
# that (the most it sends into a peer's window at once) and libslirp's own segment size
# is 65480, so it sends no window update until the window can take two of those, more
# than the whole window: the child's TCP waits for its persist timer, >= 200 ms. At MTU
# 21885 (segments of 21845 bytes, three to a window), by the time the child has to wait
# the window has room for two of libslirp's segments, and the update comes. Measured
# here, child->host TCP: no stalled 0.1 s interval in 12 rounds against 94, 5.8 against
# 5.0 Gbit/s (docs/performance.md). The interface keeps the MTU asked for
# (configure_child): datagrams up to it reach slirp4netns whole (it reads frames of up
# to 64 KiB whatever its --mtu); only TCP segments are smaller.
SLIRP_MTU_CAP = 21885
API_SOCKET = "slirp4netns.sock"  # in the state dir; the slirp4netns port driver talks to it


class Slirp4netnsDriver(HelperDriver):
    name = "slirp4netns"
    binary_flag = "--slirp4netns-binary"
    package = "slirp4netns"

    def preflight(self) -> None:
        super().preflight()
        c = self.config
        self.options = []
        if c.disable_host_loopback:
            self.options.append("--disable-host-loopback")
        if c.ipv6:
            self.options.append("--enable-ipv6")
        for flag, value in (("--enable-sandbox", c.slirp4netns_sandbox),
                            ("--enable-seccomp", c.slirp4netns_seccomp)):
            if self._wanted(flag, value):
                self.options.append(flag)
        self._exit_w = -1
        # What makes slirp4netns go when we do, even by SIGKILL: a parent-death signal
        # set by setpriv as it execs slirp4netns (0.3 ms), else its --exit-fd. Not the
        # exit fd first: slirp4netns polls every fd it watches once per packet, and each
        # one costs it about 0.5 % of its throughput (docs/performance.md).
        self._setpriv = which("setpriv")

    def _wanted(self, flag: str, value: str) -> bool:
        if value == "false":
            return False
        supported = flag in capture_output([self.binary, "--help"])
        if value == "true" and not supported:
            name = flag.removeprefix("--enable-")
            raise UsageError(f"--slirp4netns-{name}=true, but {self.binary} has no {flag}: "
                             f"use --slirp4netns-{name}=auto or a newer slirp4netns")
        return supported

    def start(self, child_pid: int, state_dir: str, netns_path: str | None = None):
        log = os.path.join(state_dir, "slirp4netns.log")
        ready_r, ready_w = os.pipe()
        keep = [ready_w]
        argv = [self.binary, "--configure", f"--mtu={min(self.mtu, SLIRP_MTU_CAP)}",
                f"--cidr={self.addressing.cidr}",
                f"--ready-fd={ready_w}", *self.options]
        if self._setpriv:
            argv[:0] = [self._setpriv, "--pdeathsig", "KILL", "--"]
        else:  # slirp4netns exits when this pipe closes
            exit_r, self._exit_w = os.pipe()
            keep.append(exit_r)
            argv.append(f"--exit-fd={exit_r}")
        # Its API socket only for the port driver that uses it, as rootlesskit does: one
        # fd less to poll for every packet otherwise. A path is all slirp4netns takes;
        # it is safe from other users, in the state dir checked 0700 and ours, on a path
        # only we or root can change (statedir), whatever mode slirp4netns gives it.
        api = os.path.join(state_dir, API_SOCKET) if self.config.port_driver == "slirp4netns" \
            else None
        if api:
            argv.append(f"--api-socket={api}")
        if netns_path:
            argv += ["--netns-type=path", f"--userns-path=/proc/{child_pid}/ns/user", netns_path]
        else:
            argv.append(str(child_pid))
        argv.append(self.config.ifname)
        try:
            pid = spawn(argv, log, keep_fds=tuple(keep), helper=self.binary)
        finally:
            for fd in keep:
                os.close(fd)
        self.helper = Helper("slirp4netns", pid, log)
        try:
            answered = readable(ready_r, _READY_TIMEOUT)
            ready = answered and os.read(ready_r, 16)
        finally:
            os.close(ready_r)
        if not ready:
            self._not_ready(answered, log)
        return self.info(api_socket=api) if api else self.info()

    def _not_ready(self, answered: bool, log: str) -> None:
        """Raise why slirp4netns gave no readiness: it died (its end of the pipe closed
        as it exited: how, then), or is stuck."""
        if answered and readable(self.helper.fd, _EXITING):
            how = f"{self.helper.how()} before the network was ready"
        else:
            how = "did not get the network ready" + (
                "" if answered else f" within {_READY_TIMEOUT:.0f} s")
        self.stop()
        raise helper_failed("slirp4netns", how, log)

    @staticmethod
    def configure_child(info) -> None:
        """slirp4netns --configure gave the interface slirp4netns' own, capped MTU: back
        to the one asked for. Under the cap they are the same: nothing to do."""
        if info.mtu > SLIRP_MTU_CAP:
            from ...linux import set_mtu

            set_mtu(info.ifname, info.mtu)

    def stop(self) -> None:
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1
        if self.helper:
            # The namespace it served is gone, so nothing is lost by killing it rather than
            # letting it wind down (13 ms), nor by not waiting for its exit: the kernel's
            # teardown of its tap device takes another 15 ms, and once it is SIGKILLed
            # whoever inherits it reaps it. Through its pidfd: the supervisor may have
            # reaped it already, and its pid be another process's.
            self.helper.signal(signal.SIGKILL)
            self.helper.close()
            self.helper = None
