# Sourced by scripts/demo.sh and scripts/test.sh: create or update the virtual
# environment in .venv with the given extras, pinned by constraints.txt.
# Re-installs only when pyproject.toml, constraints.txt or the extras change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGELOOP_VENV:-$ROOT/.venv}"
EXTRAS="$1"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { echo "edgeloop: error: no python3 found (install Python 3.11)" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "edgeloop: creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.edgeloop-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16) $EXTRAS"
have="$(cat "$stamp" 2>/dev/null || true)"
# A stamp for a superset of extras ("dev" includes "fleet") also satisfies the request.
if [ "$have" != "$want" ] && ! { [ "$EXTRAS" = "fleet" ] && [ "$have" = "${want% *} dev" ]; }; then
  echo "edgeloop: installing edgeloop[$EXTRAS] into $VENV (first run takes a few minutes)" >&2
  log="$VENV/.edgeloop-install.log"
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    echo "edgeloop: error: installing edgeloop[$EXTRAS] failed (full log: $log)" >&2
    exit 2
  fi
  echo "$want" > "$stamp"
fi
