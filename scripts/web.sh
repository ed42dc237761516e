#!/usr/bin/env bash
# Set up (if needed) and open the web app on the built-in sample tiles (or on PROJECT_DIR).
# Extra arguments go to `semsegloop web` (e.g. --port 8081).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
project=${1:-semsegloop-sample}
shift || true
exec semsegloop web "$project" --sample "$@"
