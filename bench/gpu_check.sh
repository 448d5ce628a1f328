#!/usr/bin/env bash
# The prepared check for a lent GPU machine (torch, triton and pytest already there; it
# installs nothing and runs from this tree with PYTHONPATH=.):
#   bash bench/gpu_check.sh         1. the test suite on CUDA (every fast backend against the
#                                      reference, tests/test_triton_backend.py included, and
#                                      the CUDA-only tests: tests/test_cuda_graphs.py),
#                                   2. python -m bench.report on resnet50/101/152,
#                                   3. kernel launches per step (python -m bench.launches).
#   bash bench/gpu_check.sh --cpu   the same three steps on the CPU under the Triton
#                                   interpreter with tiny shapes, plus every kernel variant
#                                   compiled for sm_90 (bench/compile_check.py), to prove the
#                                   script and the kernels before they spend device time.
# Logs and the report go to $OUT (the folder a device run sends back) or bench/results/.
# Every step runs even if an earlier one fails; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
mode=cuda
[ "${1:-}" = "--cpu" ] && mode=cpu
out=${OUT:-bench/results/gpu_check-$mode}
mkdir -p "$out"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, show the tail
    local name=$1 limit=$2
    shift 2
    echo "== $name ($limit s max): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "   rc $rc after $((SECONDS - start)) s; last lines of $out/$name.log:"
    tail -n 30 "$out/$name.log" | sed 's/^/   | /'
    [ $rc -eq 0 ] || failed=1
}

if [ $mode = cuda ]; then
    export TRITON_INTERPRET=0 MLHD_TEST_DEVICE=cuda
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    step tests 330 "$PY" -m pytest tests -q -p no:cacheprovider --maxfail=20 --durations=10
    step report 240 "$PY" -m bench.report --device cuda --models resnet50,resnet101,resnet152 --out "$out/report.md"
    step launches 120 "$PY" -m bench.launches --device cuda --models resnet50,resnet152
else
    export TRITON_INTERPRET=1 MLHD_TEST_DEVICE=cpu
    step compile 300 env TRITON_INTERPRET=0 "$PY" -m bench.compile_check
    step tests 300 "$PY" -m pytest tests/test_triton_backend.py -q -p no:cacheprovider -x \
        -k "launch or upload or bit_identical or nonfinite or state_dict or adam-multiplicative"
    step report 300 "$PY" -m bench.report --device cpu --models tiny --repeats 2 --out "$out/report.md"
    step launches 120 "$PY" -m bench.launches --device cpu --models tiny
fi
echo "gpu_check ($mode): $([ $failed = 0 ] && echo all steps passed || echo SOME STEPS FAILED)"
exit $failed
