#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for rootless-run (run as root):
# system packages, and the Python package in a venv every user can read.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${ROOTLESS_VENV:-/opt/rootless/venv}

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# uidmap: newuidmap/newgidmap/getsubids; slirp4netns and passt (pasta): networks;
# rootlesskit: the reference we are compared with (and rootlesskit-docker-proxy, which
# rootless dockerd runs to publish ports); docker.io + iptables: rootless Docker through
# us (dockerd-rootless.sh, rootless-run -- dockerd); systemd: systemd-socket-activate
# and systemd-analyze for the socket-activation and unit tests; gdb: a test pins a
# signal in a race window with it; the rest: tests and benchmarks.
apt-get install -y -q --no-install-recommends \
    uidmap slirp4netns passt rootlesskit iperf3 busybox curl socat gdb \
    docker.io iptables systemd \
    iproute2 util-linux procps python3 python3-venv ca-certificates >/dev/null

# lxc: its setuid lxc-user-nic, which --net=lxc-user-nic runs; dnsmasq-base: the DHCP
# server the tests and the benchmark run on a bridge, in a network namespace of their
# own. Debian's lxc enables lxc-net, which on a systemd machine makes a bridge lxcbr0
# (10.0.3.1/24, with dnsmasq and NAT rules) on the host's own network as soon as the
# package is installed, and at every boot: nothing of ours needs it, and a machine
# that runs our tests must not get it. So, unless lxc-net is configured already,
# /etc/default/lxc-net (a conffile of lxc) says USE_LXC_BRIDGE="false" before lxc
# comes, and dpkg keeps it (--force-confold; the package's copy goes to
# .dpkg-dist): lxc-net then does nothing. Verified with a conffile that exists before
# its package: dpkg keeps it, without a prompt.
if [ ! -e /etc/default/lxc-net ] && ! dpkg -s lxc >/dev/null 2>&1; then
    mkdir -p /etc/default
    echo 'USE_LXC_BRIDGE="false"  # contrib/setup.sh: no lxcbr0 on this host' \
        > /etc/default/lxc-net
fi
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    lxc dnsmasq-base >/dev/null

# Debian's python3 (not a per-user one under /root) so that unprivileged users can run it.
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
fi
rm -rf "$here/build"
"$venv/bin/pip" install -q --disable-pip-version-check "$here[test]"
chmod -R a+rX "$(dirname "$venv")"
for cmd in rootless-run docker-rootlesskit rootless-ctl; do
    ln -sf "$venv/bin/$cmd" "/usr/local/bin/$cmd"
done
echo "rootless-run installed: $(/usr/local/bin/rootless-run --version)"
