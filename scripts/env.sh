# Sourced by train.sh, infer.sh and tests/run.sh: make sure a Python environment with
# requirements.txt and the project (editable) exists, then export PY (the interpreter) and PYTHONPATH.
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
  # the project installed editable (offline: no dependency resolution, the venv's own setuptools), so that
  # `.venv/bin/histoshift` and `.venv/bin/python -m histoshift` work from any folder
  if [ "$("$PY" -c 'import histoshift, pathlib; print(pathlib.Path(histoshift.__file__).parent.parent)' 2>/dev/null)" != "$REPO/src" ] \
     || [ ! -x "$VENV/bin/histoshift" ]; then
    rm -f "$VENV"/lib/python3*/site-packages/histoshift-src.pth  # the hand-made path file of earlier versions
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --no-index -e "$REPO"
  fi
fi
export PY
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
