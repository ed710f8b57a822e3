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
# and systemd-analyze for the socket-activation and unit tests; the rest: tests and
# benchmarks.
apt-get install -y -q --no-install-recommends \
    uidmap slirp4netns passt rootlesskit iperf3 busybox curl socat \
    docker.io iptables systemd \
    iproute2 util-linux procps python3 python3-venv ca-certificates >/dev/null

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
