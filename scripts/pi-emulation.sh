#!/usr/bin/env bash
# Prove the Raspberry Pi install path without a Pi: an arm64 Debian root run through
# qemu-user-static, the edgeloop wheel installed with [agent] from the real aarch64 wheels
# on PyPI, then `agent install` + `agent predict` on a signed bundle inside it.
#
#   sudo scripts/pi-emulation.sh [WORKDIR]          # default /var/tmp/edgeloop-pi
#   SUITE=trixie scripts/pi-emulation.sh            # Python 3.13 (Raspberry Pi OS trixie); default bookworm = 3.11
#
# Needs root (debootstrap, chroot, binfmt_misc) and the network to Debian's mirror (the one
# in /etc/apt/sources.list[.d]) and to PyPI.  Slow: emulated pip and numpy take 15-40 min.
# The last line is "pi-emulation: OK ..." or "pi-emulation: FAILED ...".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/var/tmp/edgeloop-pi}"
SUITE="${SUITE:-bookworm}"
CHROOT="$WORK/rootfs-$SUITE"
PY_HOST="${PYTHON:-$ROOT/.venv/bin/python}"
say() { echo "pi-emulation: $*" >&2; }
fail() { echo "pi-emulation: FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and chroot need it)"
mkdir -p "$WORK"

# 1. qemu-user-static + binfmt: the host kernel runs aarch64 binaries through qemu
if ! command -v debootstrap >/dev/null || [ ! -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] \
    && ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap binfmt-support >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || fail "binfmt_misc has no qemu-aarch64 entry (update-binfmts --enable qemu-aarch64)"
# Debian 12's qemu 7.2 segfaults loading onnxruntime's extension in a Trixie root (glibc 2.41,
# Python 3.13); qemu 10 (bookworm-backports) runs it.  Bookworm roots work with either.
QEMU_MAJOR="$(qemu-aarch64-static --version 2>/dev/null | head -1 | grep -oE '[0-9]+' | head -1 || true)"
if [ "$SUITE" != bookworm ] && [ -n "$QEMU_MAJOR" ] && [ "$QEMU_MAJOR" -lt 8 ]; then
  fail "qemu $QEMU_MAJOR cannot run onnxruntime in a $SUITE root; install qemu-user-static >= 8 (on Debian 12: apt-get install -t bookworm-backports qemu-user-static), then update-binfmts --disable qemu-aarch64 && update-binfmts --enable qemu-aarch64"
fi

# 2. the arm64 root, from the mirror apt already uses here
MIRROR="$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
          2>/dev/null | grep -v security | head -1 | awk '{print $2}' || true)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
if [ ! -x "$CHROOT/usr/bin/python3" ]; then
  say "debootstrap --arch=arm64 $SUITE from $MIRROR into $CHROOT"
  rm -rf "$CHROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$CHROOT" "$MIRROR" > "$WORK/debootstrap-$SUITE.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap-$SUITE.log"; fail "debootstrap (log: $WORK/debootstrap-$SUITE.log)"; }
fi
cp /etc/resolv.conf "$CHROOT/etc/resolv.conf"
# trust what the host trusts (a TLS-intercepting proxy's CA lives only in the host's bundle)
HOST_CA="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
[ -f "$HOST_CA" ] && cp "$HOST_CA" "$CHROOT/etc/ssl/certs/host-ca-bundle.crt"
mountpoint -q "$CHROOT/proc" || mount -t proc proc "$CHROOT/proc"
mountpoint -q "$CHROOT/dev" || mount --bind /dev "$CHROOT/dev"
mountpoint -q "$CHROOT/sys" || mount -t sysfs sysfs "$CHROOT/sys"  # onnxruntime's cpuinfo reads /sys/devices/system/cpu
cleanup() { umount "$CHROOT/proc" "$CHROOT/dev" "$CHROOT/sys" 2>/dev/null || true; }
trap cleanup EXIT
in_root() { chroot "$CHROOT" /usr/bin/env -i HOME=/root PATH=/opt/edgeloop/bin:/usr/bin:/bin LANG=C.UTF-8 \
  PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DEFAULT_TIMEOUT=180 "$@"; }
say "emulated: $(in_root uname -m), $(in_root python3 -V)"

# 3. the wheel and a signed bundle, built on the host
DIST="$WORK/dist"
rm -rf "$DIST" && mkdir -p "$DIST"
rm -rf "$WORK/src" && mkdir -p "$WORK/src"  # build from a copy: setuptools writes build/ next to the sources
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
"$PY_HOST" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DIST" "$WORK/src" >/dev/null
(cd "$ROOT" && "$PY_HOST" - "$DIST" <<'EOF'
import shutil, sys
from pathlib import Path
from tests.plugins.agent_kit import keys, make_bundle
out = Path(sys.argv[1])
make_bundle(out / "tiny-1.0.0.elb", "1.0.0")
shutil.copy(keys().public, out / "fleet.pub")
EOF
)
cp "$ROOT/constraints.txt" "$DIST/"
rm -rf "$CHROOT/opt/dist" && cp -r "$DIST" "$CHROOT/opt/dist"
WHEEL="$(cd "$DIST" && ls edgeloop-*.whl | head -1)"

# 4. install [agent] from PyPI's aarch64 wheels (binary only: a Pi must not compile numpy)
say "pip install $WHEEL[agent] inside the arm64 root (slow under emulation)"
t0=$(date +%s)
in_root sh -c "python3 -m venv /opt/edgeloop && /opt/edgeloop/bin/pip install --quiet --disable-pip-version-check \
  --only-binary=:all: -c /opt/dist/constraints.txt '/opt/dist/$WHEEL[agent]'" || fail "pip install in the arm64 root"
say "installed in $(( $(date +%s) - t0 )) s: $(in_root /opt/edgeloop/bin/pip freeze | grep -iE '^(numpy|onnxruntime|paho-mqtt|edgeloop)' | tr '\n' ' ')"

# 5. the agent: init, install, predict, status
in_root sh -c "set -e; rm -rf /opt/pi && mkdir -p /opt/pi && cd /opt/pi && cp /opt/dist/fleet.pub . &&
  edgeloop agent init agent.toml --device-id pi-emulated --trusted-key fleet.pub >/dev/null" || fail "agent init"
"$PY_HOST" - "$CHROOT/opt/pi/digit.npy" <<'EOF'
import sys, numpy as np
from sklearn.datasets import load_digits
np.save(sys.argv[1], np.clip(load_digits().images[0] * 16, 0, 255).astype(np.uint8))
EOF
t0=$(date +%s)
INSTALL="$(in_root sh -c 'cd /opt/pi && edgeloop agent install -c agent.toml /opt/dist/tiny-1.0.0.elb --json')" \
  || fail "agent install"
PRED="$(in_root sh -c 'cd /opt/pi && edgeloop agent predict -c agent.toml digit.npy --json')" || fail "agent predict"
echo "$INSTALL" > "$WORK/install-$SUITE.json"
echo "$PRED" > "$WORK/predict-$SUITE.json"
LABEL="$(echo "$PRED" | "$PY_HOST" -c 'import json,sys; d=json.load(sys.stdin); print(d["label"], round(d["confidence"],3), d["variant"])')"
echo "pi-emulation: OK $SUITE $(in_root uname -m) $(in_root python3 -V): agent install + predict -> digit.npy is ${LABEL} (expected label 0) in $(( $(date +%s) - t0 )) s"
