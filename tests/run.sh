#!/usr/bin/env bash
# The test command: sets up .venv from requirements.txt when needed, then runs every test on CPU.
#   bash tests/run.sh               all tests, the end-to-end demo run included (465 s on 2 idle cores, 2026-12-07)
#   bash tests/run.sh -m "not slow" the quick ones (28 s)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export HF_HUB_OFFLINE=1
# TEST_WORKERS processes (pytest-xdist; default 2, 0 = one process) share the tests a file at a time (a file's
# tests share their fixtures and the ports they open), each with one math thread: on 2 cores the suite is half
# Python and process start-up, which one process cannot overlap with the other's compute.
WORKERS="${TEST_WORKERS:-2}"
if [ "$WORKERS" != 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  set -- -n "$WORKERS" --dist loadfile "$@"
fi
exec "$PY" -m pytest -p no:cacheprovider -q --durations=15 "$@"
