"""What only the compiled Triton kernels show, checked in their PTX for sm_90 (H100/H200)
without a GPU: `bench.compile_check` compiles the captured reduce and step variants of an
Adam configuration that reaches every Adam path (all levels, the multiplicative rule,
coupled weight decay, maximize; contiguous and strided layouts).

The interpreter that runs the rest of the suite on the CPU computes IEEE results and
never compiles, so what is checked here cannot show there."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run in a fresh interpreter: this process defines the kernels for the Triton interpreter.
SCRIPT = """
import json, sys, torch
from bench import compile_check as cc
missing = cc.cuda_compiler_missing(90)
if missing is not None:
    print(json.dumps({"missing": missing}))
    sys.exit()
variants = []
for name, switches, _, ptx in cc.compile_variants(90, ("reduce_kernel", "step_kernel"), cc.CONFIGS[1:2], (torch.float32,)):
    if isinstance(ptx, Exception):
        raise ptx
    variants.append([name, switches, cc.ptx_counts(ptx)])
print(json.dumps({"variants": variants}))
"""


@pytest.fixture(scope="module")
def variants():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "missing" in result:
        pytest.skip(result["missing"])
    names = sorted({name for name, _, _ in result["variants"]})
    assert names == ["reduce_kernel", "step_kernel"]
    return result["variants"]


def test_division_and_square_root_round_as_ieee(variants):
    """torch.optim's fused Adam and the cuda backend round `/` and sqrt as IEEE does; on
    CUDA Triton's `/` and tl.sqrt are approximations (div.full.f32, sqrt.approx.ftz.f32)."""
    approximate = [(name, switches) for name, switches, counts in variants if counts["approximate div/sqrt"]]
    assert approximate == []


def test_reduction_has_no_64_bit_division(variants):
    """A 64-bit integer division is a software routine of dozens of instructions on the
    GPU; the reduction must not run one per element (tile row or column)."""
    counts = [(switches, c["64-bit div/rem"]) for name, switches, c in variants if name == "reduce_kernel"]
    assert len(counts) == 2  # contiguous and strided
    assert all(n == 0 for _, n in counts), counts
