#!/usr/bin/env bash
# Run the SemSegLoop self-test (SemSegLoopTest in SemSegLoop/SemSegLoop.py) headless in a real
# 3D Slicer, for users' CI: installs the engine's Python packages into Slicer's own Python first
# (testing mode never installs anything), then runs the test under xvfb and fails if it fails.
#
# usage: Testing/run_slicer_selftest.sh /path/to/Slicer
#   SEMSEGLOOP_TORCH_INDEX  pip index for torch (default: the CPU wheels at download.pytorch.org)
#   SEMSEGLOOP_SKIP_INSTALL=1  skip the package installation (already done)
set -euo pipefail

if [[ $# -lt 1 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  echo "usage: $0 SLICER_EXECUTABLE" >&2
  echo "  Runs SemSegLoopTest headless (xvfb-run) in that Slicer; exit status 0 means it passed." >&2
  exit 2
fi

SLICER="$1"
if [[ ! -x "$SLICER" ]]; then
  echo "error: Slicer executable not found or not executable: $SLICER" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULE_DIR="$REPO/SemSegLoop"
SLICER_DIR="$(cd "$(dirname "$SLICER")" && pwd)"

# PythonSlicer sits next to the Slicer launcher (bin/PythonSlicer in a Linux/Windows package or
# a build tree); on macOS the launcher is Slicer.app/Contents/MacOS/Slicer and PythonSlicer is in
# Slicer.app/Contents/bin.
PYTHON_SLICER=""
for candidate in "$SLICER_DIR/bin/PythonSlicer" "$SLICER_DIR/PythonSlicer" "$SLICER_DIR/../bin/PythonSlicer" \
                 "$SLICER_DIR/bin/PythonSlicer.exe" "$SLICER_DIR/PythonSlicer.exe"; do
  if [[ -x "$candidate" ]]; then PYTHON_SLICER="$candidate"; break; fi
done

if [[ "${SEMSEGLOOP_SKIP_INSTALL:-0}" != "1" ]]; then
  if [[ -z "$PYTHON_SLICER" ]]; then
    echo "error: PythonSlicer not found next to $SLICER; set SEMSEGLOOP_SKIP_INSTALL=1 if the packages are installed" >&2
    exit 2
  fi
  # Pin Slicer's own numpy/SimpleITK/scipy so pip can never replace them (see Logic/dependencies.py).
  CONSTRAINTS="$(mktemp -t semsegloop-constraints.XXXXXX)"
  trap 'rm -f "$CONSTRAINTS"' EXIT
  "$PYTHON_SLICER" - "$CONSTRAINTS" <<'PY'
import importlib.metadata as m, sys
lines = []
for name in ("numpy", "SimpleITK", "scipy", "pillow"):
    try:
        lines.append(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
  TORCH_INDEX="${SEMSEGLOOP_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  "$PYTHON_SLICER" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" \
    --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple "torch>=2.1"
  "$PYTHON_SLICER" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" \
    -r "$MODULE_DIR/Resources/requirements.txt"
fi

# A virtual X display only where Slicer needs X and has none: Linux without DISPLAY (macOS and
# Windows draw without X; a desktop session already has a display).
RUNNER=()
case "$(uname -s)" in
  Linux*)
    if [[ -z "${DISPLAY:-}" && -z "${WAYLAND_DISPLAY:-}" ]]; then
      if ! command -v xvfb-run >/dev/null; then
        echo "error: no DISPLAY and xvfb-run is not installed (apt-get install xvfb)" >&2
        exit 2
      fi
      RUNNER=(xvfb-run -a)
    fi
    ;;
esac

# --testing makes Slicer exit as soon as the code returns, with a failure status when
# runUnitTest raised (a failed or erroring test).
set +e
# ${RUNNER[@]+...}: bash 3.2 (macOS) with set -u treats an empty array as unset.
${RUNNER[@]+"${RUNNER[@]}"} "$SLICER" --no-splash --no-main-window --testing \
  --additional-module-paths "$MODULE_DIR" \
  --python-code "import slicer.testing; slicer.testing.runUnitTest(['$MODULE_DIR'], 'SemSegLoop')"
status=$?
set -e
if [[ $status -ne 0 ]]; then
  echo "SemSegLoop self-test FAILED (exit status $status)" >&2
else
  echo "SemSegLoop self-test passed"
fi
exit "$status"
