#!/usr/bin/env bash
# README's main-job command: install everything, then train and compare optimizers on
# real data (python -m bench.train; --quick for a smoke run under a minute).
set -euo pipefail
. "$(dirname "$0")/../.ci/setup.sh"
python -m bench.train "$@"
