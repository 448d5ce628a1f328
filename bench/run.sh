#!/usr/bin/env bash
# README's main-job command: install everything, then print the step benchmark table.
set -euo pipefail
. "$(dirname "$0")/../.ci/setup.sh"
python -m bench.report "$@"
