#!/usr/bin/env bash
# Set up SemSegLoop in ./.venv on a fresh machine (idempotent: a second run only checks).
# torch is pinned to the CPU build first so that neither monai nor our own requirement pulls a
# multi-GB CUDA build; on a GPU machine set SEMSEGLOOP_TORCH to the wanted spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "${SEMSEGLOOP_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test,bench]"
python -c "import semsegloop, torch, monai; print('semsegloop', semsegloop.__version__, '| torch', torch.__version__, '| monai', monai.__version__)"
