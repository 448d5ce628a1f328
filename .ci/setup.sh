# Sourced by .ci/run and bench/run.sh: make .venv with everything the project needs.
# torch is pinned and installed first: 2.13.0 is the CPU wheel on this machine's disk, and
# an unpinned torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q torch==2.13.0
# torch named again so that no extra's requirement can move it off the pinned wheel
pip install -q -e ".[test,examples,integrations]" torch==2.13.0
