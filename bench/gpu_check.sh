#!/usr/bin/env bash
# One prepared check on a lent GPU machine (one H100 or H200, at most 5 minutes), or its CPU
# dry run, so that a broken script never spends device time:
#   bash bench/gpu_check.sh         with the machine's own python3 (torch, triton, nvcc, pytest
#                                   are there) from this tree, PYTHONPATH=.; installs nothing
#   bash bench/gpu_check.sh --cpu   the same stages on the CPU: Triton interpreter, tiny shapes,
#                                   the cuda backend's kernels emulated (MLHD_CUDA_ON_CPU=1) beside
#                                   the cpp backend, no compute-sanitizer, plus
#                                   every Triton kernel variant compiled for sm_90
# Every stage runs under its own time limit (the GPU run's limits add up to 290 s) and
# prints a line when it starts and one with its result and time, so a run cut short still
# says where it got. A failed stage does not stop the later ones (their results still say
# something), except the preflight; the last line and the exit status say whether all
# passed (a timed-out `compile`, a benchmark whose Inductor compilation time nobody can
# promise, is reported but not counted). GPU_CHECK_STAGES=preflight,build,sanitize (say)
# runs only the stages named. Output goes to $OUT when set (the folder a device run sends back), else to
# bench/results/gpu_check-<mode>/: gpu_check.log (every stage's whole output), stages.tsv,
# report.md, compile.md, throughput_<device>.md and gpu.md (the GPU run also writes
# bench/results/gpu.md, to be committed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mode=cuda
[ "${1:-}" = "--cpu" ] && mode=cpu
out=${OUT:-bench/results/gpu_check-$mode}
mkdir -p "$out"
log=$out/gpu_check.log
: >"$log"
: >"$out/stages.tsv"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Only the stages named here run (all when unset): the CI test runs a cheap subset.
only=${GPU_CHECK_STAGES:-}

if [ $mode = cuda ]; then
    PY=${PYTHON:-python3}  # the GPU machine's python3 is the one with torch
    export MLHD_TEST_DEVICE=cuda TRITON_INTERPRET=0 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
else
    PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    # the compiled backend's CUDA kernels run on the CPU too, emulated (csrc/cuda_on_cpu)
    export MLHD_TEST_DEVICE=cpu TRITON_INTERPRET=1 MLHD_CUDA_ON_CPU=${MLHD_CUDA_ON_CPU:-1}
fi
# cuda is left out by conftest where it cannot run; the build stage fails loudly instead
export MLHD_TEST_BACKENDS=torch,triton,cuda

t0=$SECONDS
failed=()
stage() {  # stage NAME LIMIT COMMAND...: run it under a time limit, its output into the log
    local name=$1 limit=$2
    shift 2
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
        return 0
    fi
    echo "== $name: started at +$((SECONDS - t0)) s, limit $limit s: $*"
    printf '\n===== stage %s (limit %s s): %s\n' "$name" "$limit" "$*" >>"$log"
    local offset start=$SECONDS rc status
    offset=$(wc -c <"$log")
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        124 | 137) status="TIMED OUT" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    if [ "$name" = compile ] && [ "$status" = "TIMED OUT" ]; then
        status="TIMED OUT (not counted: a benchmark)"
        rc=0
    fi
    tail -c +$((offset + 1)) "$log" | grep -v -e '^\s*$' -e 'it/s\]' -e 's/it\]' | tail -n 12 | sed 's/^/   | /'
    echo "== $name: $status after $((SECONDS - start)) s (limit $limit s; +$((SECONDS - t0)) s in all)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$((SECONDS - start))" "$status" >>"$out/stages.tsv"
    [ $rc -eq 0 ] || failed+=("$name")
    return $rc
}

# pytest, with the reasons of skips and failures; on the GPU one line per test, so that a
# stage cut short still shows what ran, and several workers where the machine's 16 cores
# and pytest-xdist allow (Triton compiles and the reference oracle run on the CPU). In
# one process the heavy cases, and of the GPU tests all but the GPU-only ones, would not
# fit the time limits.
PYTEST=("$PY" -m pytest -p no:cacheprovider -rfEs --durations=5 "$([ $mode = cuda ] && echo -v || echo -q)")
PAR=() LIGHT=(-m "not heavy") FOCUS=(-k "gpu_hazards or cuda_graphs or no_host_sync or nonfinite or overflow or odd_size")
if [ $mode = cuda ] && "$PY" -c "import xdist" 2>/dev/null; then
    PAR=(-n 8) LIGHT=() FOCUS=()
fi
# After a failed (exit 2) or cut-short build every later process would try to build again,
# each for a minute: an unusable compiler makes them give up at once (cuda then drops out
# of the tests, which the build stage has already reported as a failure).
after_build() {
    case $1 in
        2 | 124 | 137)
            echo "== the extension did not build: later stages run without it (CXX set to a missing compiler)"
            export CXX=mlhd-extension-build-failed
            ;;
    esac
}
# The GPU tests: whole-iteration capture, misaligned views, 2**31 elements (test_gpu_hazards),
# step capture (test_cuda_graphs), AMP, the triton kernels' own tests (incl. no host sync
# and plain Adam against torch.optim), the NaN skip, sync-debug "error" around every backend.
ADAM_ROWS=mlhd-adam-torch,mlhd-adam-triton,mlhd-adam-cuda,mlhd-adam-cpp,adam-for-loop,adam-foreach,adam-fused
GPU_TESTS=(tests/test_gpu_hazards.py tests/test_cuda_graphs.py tests/test_amp.py tests/test_triton_backend.py
    tests/test_invariants.py::test_fast_step_needs_no_host_sync
    tests/test_invariants.py::test_nonfinite_gradient_skips_the_group_step)

if [ $mode = cuda ]; then
    # limits: 15 + 60 + 45 + 45 + 25 + 25 + 35 + 35 + 5 = 290 s
    stage preflight 15 "$PY" -m bench.gpu_check preflight --device cuda ||
        { echo "gpu_check (cuda): PREFLIGHT FAILED, nothing else can run"; exit 1; }
    stage build 60 "$PY" -m bench.gpu_check build --device cuda
    after_build $?
    stage gpu-tests 45 "${PYTEST[@]}" "${PAR[@]}" "${FOCUS[@]}" "${GPU_TESTS[@]}"
    # conformance: every option case against the float64 reference (triton on the suite's
    # small shapes without the heavy cases, as the conftest does for it: each case is a
    # Triton compilation)
    MLHD_TEST_BACKENDS=triton,cuda stage conformance 45 "${PYTEST[@]}" "${PAR[@]}" "${LIGHT[@]}" \
        tests/test_backends.py
    # the Adam rows only: each further configuration is five more Triton compilations
    stage report 25 "$PY" -m bench.report --device cuda --models resnet50 --repeats 50 --only "$ADAM_ROWS" \
        --out "$out/report.md"
    stage throughput 25 "$PY" -m bench.train --throughput --device cuda --backends triton,cuda \
        --batch-size 96 --steps 10 --out "$out"
    stage sanitize 35 "$PY" -m bench.gpu_check sanitize --device cuda --timeout 30
    # Inductor compiles the ResNet-50 step in the warm-up: the hardest stage to predict, last
    stage compile 35 "$PY" -m bench.report --device cuda --models resnet50 --repeats 50 \
        --only mlhd-adam-torch,adam-fused --compile --out "$out/compile.md"
    stage summary 5 "$PY" -m bench.gpu_check summary --mode cuda --out "$out"
else
    stage preflight 30 "$PY" -m bench.gpu_check preflight --device cpu ||
        { echo "gpu_check (cpu): PREFLIGHT FAILED, nothing else can run"; exit 1; }
    stage build 300 "$PY" -m bench.gpu_check build --device cpu
    after_build $?
    stage sm90-compile 300 env TRITON_INTERPRET=0 "$PY" -m bench.compile_check
    stage gpu-tests 300 "${PYTEST[@]}" "${FOCUS[@]}" "${GPU_TESTS[@]}"
    MLHD_TEST_BACKENDS=triton,cuda stage conformance 300 "${PYTEST[@]}" "${LIGHT[@]}" \
        -k "adam-default or sgd-nesterov" tests/test_backends.py
    stage report 300 "$PY" -m bench.report --device cpu --models tiny --repeats 2 --only "$ADAM_ROWS" \
        --out "$out/report.md"
    stage throughput 300 "$PY" -m bench.train --throughput --device cpu --backends cpp \
        --batch-size 2 --image-size 64 --steps 2 --out "$out"
    stage sanitize 120 "$PY" -m bench.gpu_check sanitize --device cpu --timeout 110
    stage compile 300 "$PY" -m bench.report --device cpu --models tiny --repeats 2 \
        --only mlhd-adam-torch,adam-fused --compile --out "$out/compile.md"
    stage summary 30 "$PY" -m bench.gpu_check summary --mode cpu --out "$out"
fi
if [ ${#failed[@]} = 0 ]; then
    echo "gpu_check ($mode): all steps passed in $((SECONDS - t0)) s; results in $out"
else
    echo "gpu_check ($mode): SOME STEPS FAILED: ${failed[*]} ($((SECONDS - t0)) s; see $log)"
fi
[ ${#failed[@]} = 0 ]
