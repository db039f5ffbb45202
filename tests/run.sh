#!/usr/bin/env bash
# The test command: sets up .venv from requirements.txt when needed, then runs every test on CPU.
#   bash tests/run.sh               all tests, the end-to-end demo run included (8-13 minutes on 2 cores)
#   bash tests/run.sh -m "not slow" the quick ones
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export HF_HUB_OFFLINE=1
exec "$PY" -m pytest -p no:cacheprovider -q "$@"
