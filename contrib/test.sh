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
# RLT_SLOT=N (N > 0): a user pair of its own (rlt-testN, rlt-nosubN), so that several
# checkouts (each with its own ROOTLESS_VENV) can be tested at the same time.
slot=${RLT_SLOT:-0}
suffix=$([ "$slot" = 0 ] || echo "$slot")
export RLT_SLOT=$slot RLT_TEST_USER=rlt-test$suffix RLT_NOSUB_USER=rlt-nosub$suffix
add_user "$RLT_TEST_USER" $((1001 + 10 * slot))
add_user "$RLT_NOSUB_USER" $((1002 + 10 * slot))
for f in /etc/subuid /etc/subgid; do
    touch "$f"
    grep -q "^$RLT_TEST_USER:" "$f" || echo "$RLT_TEST_USER:$((100000 + 65536 * slot)):65536" >> "$f"
    sed -i "/^$RLT_NOSUB_USER:/d" "$f"
done
chmod 666 /dev/net/tun 2>/dev/null || true

# Test the code of this checkout, not what was installed before (a stale build/ dir
# would make pip reuse files older than their copies there).
rm -rf "$here/build"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$here"
chmod -R a+rX "$(dirname "$venv")"

cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
