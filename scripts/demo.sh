#!/usr/bin/env bash
# The closed-loop demo on embedded defaults: ./scripts/demo.sh [edgeloop demo options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_venv.sh" fleet
exec "$VENV/bin/edgeloop" demo "$@"
