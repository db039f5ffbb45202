# Sourced by train.sh, infer.sh and tests/run.sh: make sure a Python environment with
# requirements.txt exists, then export PY (the interpreter) and PYTHONPATH.
# Set PY=/path/to/python to use an environment of your own instead of .venv.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PY:-}" ]; then
  VENV="${VENV:-$REPO/.venv}"
  STAMP="$VENV/.requirements.sha256"
  WANT="$(cat "$REPO/requirements.txt" "$REPO/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "== setting up $VENV from requirements.txt (once, about 2 minutes)"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO/requirements.txt"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$REPO/requirements-nodeps.txt"
    echo "$WANT" > "$STAMP"
  fi
  PY="$VENV/bin/python"
  # the package on the venv's path (like `pip install -e .`, offline): `.venv/bin/python -m histoshift` works anywhere
  PTH="$(ls "$VENV"/lib/python3*/site-packages/histoshift-src.pth 2>/dev/null || true)"
  if [ -z "$PTH" ] || [ "$(cat "$PTH")" != "$REPO/src" ]; then
    "$PY" -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "histoshift-src.pth").write_text(sys.argv[1] + "\n")' "$REPO/src"
  fi
fi
export PY
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
