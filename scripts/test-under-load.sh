#!/usr/bin/env bash
# The test suite on a busy machine: ./scripts/test-under-load.sh [--procs N] [pytest options]
#
# Starts N CPU-burning processes (default: one per core, as `nproc` counts them) at the
# tests' own priority, runs ./scripts/test.sh with the remaining arguments, and kills the
# burners when it ends, whatever happens (success, failure, Ctrl-C, SIGTERM).  The exit
# status is the suite's.  EDGELOOP_TEST_CMD replaces ./scripts/test.sh (e.g. to run
# `.venv/bin/python -m pytest` directly in a checkout whose venv is ready).
#
#   ./scripts/test-under-load.sh                      # the whole suite, one burner per core
#   ./scripts/test-under-load.sh --procs 4 tests/fleet -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROCS="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
if [ "${1:-}" = "--procs" ]; then
  PROCS="${2:?--procs needs a number}"
  shift 2
fi
case "$PROCS" in ''|*[!0-9]*) echo "test-under-load: --procs must be a number, not '$PROCS'" >&2; exit 2 ;; esac

BURNERS=()
stop_burners() {
  local pid
  for pid in "${BURNERS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${BURNERS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  BURNERS=()
}
trap stop_burners EXIT
trap 'stop_burners; exit 130' INT
trap 'stop_burners; exit 143' TERM

for _ in $(seq 1 "$PROCS"); do
  ( trap - INT TERM; while :; do :; done ) &
  BURNERS+=("$!")
done
echo "test-under-load: $PROCS busy-loop processes (pids ${BURNERS[*]}) on $(nproc 2>/dev/null || echo '?') cores" >&2

cd "$ROOT"
status=0
if [ -n "${EDGELOOP_TEST_CMD:-}" ]; then
  # shellcheck disable=SC2086  # the command is meant to be split into words
  $EDGELOOP_TEST_CMD "$@" || status=$?
else
  "$ROOT/scripts/test.sh" "$@" || status=$?
fi
echo "test-under-load: suite exit status $status with $PROCS burners" >&2
exit "$status"
