#!/usr/bin/env bash
# The test suite: ./scripts/test.sh [pytest options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_venv.sh" dev
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
