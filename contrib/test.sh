#!/usr/bin/env bash
# Run the whole test suite (as root). It prepares what the tests need: the test users
# (one with subordinate ids, one without), their /run/user dirs, a usable /dev/net/tun,
# and the current checkout installed in the venv. Every namespace test then runs
# rootless-run as the unprivileged user; pytest itself stays root to set things up.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${ROOTLESS_VENV:-/opt/rootless/venv}
[ "$(id -u)" = 0 ] || { echo "contrib/test.sh: run as root (it creates test users)" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$here/contrib/setup.sh"

add_user() {  # name uid
    id -u "$1" >/dev/null 2>&1 || useradd --create-home --uid "$2" --shell /bin/bash "$1"
    install -d -o "$1" -g "$1" -m 700 "/run/user/$2"
}
add_user rlt-test 1001
add_user rlt-nosub 1002
for f in /etc/subuid /etc/subgid; do
    touch "$f"
    grep -q '^rlt-test:' "$f" || echo 'rlt-test:100000:65536' >> "$f"
    sed -i '/^rlt-nosub:/d' "$f"
done
chmod 666 /dev/net/tun 2>/dev/null || true

# Test the code of this checkout, not what was installed before (a stale build/ dir
# would make pip reuse files older than their copies there).
rm -rf "$here/build"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$here"
chmod -R a+rX "$(dirname "$venv")"

cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
