#!/usr/bin/env bash
# Set up (if needed) and run the built-in demo: synthetic tiles, simulated strokes, two rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-demo_output/run_$(date +%Y%m%d_%H%M%S)}
semsegloop demo --out "$out"
