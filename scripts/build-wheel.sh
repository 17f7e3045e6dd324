#!/usr/bin/env bash
# Build the edgeloop wheel (pure Python, one file for every platform) into dist/:
#   ./scripts/build-wheel.sh            -> dist/edgeloop-<version>-py3-none-any.whl
# Copy it to a device and install it there with the extras that device needs, e.g. on a
# Raspberry Pi:  pip install -c constraints.txt "edgeloop-0.1.0-py3-none-any.whl[agent]"
# (docs/agent.md, "Install on a Raspberry Pi").  Needs only Python 3.10+ with pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/dist}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || { echo "edgeloop: error: $PY not found (install Python 3.11)" >&2; exit 2; }
mkdir -p "$OUT"
# A throwaway build folder: the working tree stays clean, the wheel is reproducible.
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$BUILD" "$ROOT"
cp "$BUILD"/edgeloop-*.whl "$OUT"/
cp "$ROOT/constraints.txt" "$OUT"/
ls -1 "$OUT"/edgeloop-*.whl
