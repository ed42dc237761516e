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
# The stamp records what was installed; the install runs again when pyproject.toml or the torch
# spec changes, or when an import fails.
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${SEMSEGLOOP_TORCH:-torch==2.13.0}"
stamp=.venv/.semsegloop-installed
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || \
   ! python -c "import semsegloop.project, torch, monai, sklearn, skimage, slicer, trame_slicer" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -m pip install -q "${SEMSEGLOOP_TORCH:-torch==2.13.0}"
  log=$(mktemp)
  if ! python -m pip install -q -e ".[test,bench,web]" >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; exit 1
  fi
  rm -f "$log"   # setuptools' deprecation chatter on success is not worth reading
  echo "$want" > "$stamp"
fi
# GeodisTK (optional, faster geodesic maps for Refine) has no wheel: build it where a C++
# compiler is at hand; numpy 2 needs the NPY_IN_ARRAY alias. Without it the numpy raster scan
# serves. CI must build it, so the tests exercise both paths.
if ! python -c "import GeodisTK" >/dev/null 2>&1 && [ "${SEMSEGLOOP_NO_GEODISTK:-}" != 1 ]; then
  if command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1; then
    log=$(mktemp)
    if ! { python -m pip install -q setuptools && CPPFLAGS="-DNPY_IN_ARRAY=NPY_ARRAY_IN_ARRAY ${CPPFLAGS:-}" \
           python -m pip install -q --no-build-isolation GeodisTK; } >"$log" 2>&1; then
      if [ "${CI:-}" = true ]; then cat "$log"; rm -f "$log"; echo "GeodisTK build failed" >&2; exit 1; fi
      echo "note: GeodisTK did not build (Refine uses the numpy raster scan instead)" >&2
    fi
    rm -f "$log"
  elif [ "${CI:-}" = true ]; then
    echo "CI needs a C++ compiler to build GeodisTK (apt-get install g++)" >&2; exit 1
  fi
fi
python -c "import semsegloop, torch, monai; print('semsegloop', semsegloop.__version__, '| torch', torch.__version__, '| monai', monai.__version__)"
