#!/usr/bin/env bash
# Creates .venv with the CPU stack and the package (editable). Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sharded_negcache-installed
want=$(cat requirements-cpu.txt pyproject.toml | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-cpu.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  # the extras' requirements must not move torch off the pin (pip would silently swap the build)
  .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 'torch moved to ' + torch.__version__)"
  echo "$want" > "$stamp"
fi
