"""Every fast backend against the ``reference`` backend on 12-step trajectories.

* float64 backend vs float64 reference: rtol 1e-10 (every option case, every level subset
  of every class);
* float32 backend vs float64 reference: rtol 1e-4 (every option case);
* bfloat16 backend vs bfloat16 reference, and vs float64 reference, loosely.

Compared at every step: parameters, every level's rates, the weights, effective_rate of every
parameter, the skip counters.  test_reference_oracle.py shows that the rates and weights of
these cases move well beyond these tolerances, so the comparisons can fail.
"""
import pytest
import torch

from cases import LIGHT_CASE_NAMES, OPTION_CASES, SUBSET_CASES
from conftest import DEVICE, FAST_BACKENDS, shapes_for
from trajectory import (TOL_F32, TOL_F64, Tol, assert_trajectories_close, run_case)

if not FAST_BACKENDS:  # pragma: no cover
    pytest.skip("no fast backend on this device", allow_module_level=True)


def _cases(cases):
    return [pytest.param(c, id=c.name,
                         marks=() if c.name in LIGHT_CASE_NAMES else pytest.mark.heavy)
            for c in cases]


def _vs_reference(case, backend, dtype, ref_dtype, tol):
    shapes = shapes_for(backend)
    fast = run_case(case, backend, dtype, shapes=shapes, device=DEVICE)
    ref = run_case(case, "reference", ref_dtype, shapes=shapes)
    assert_trajectories_close(fast, ref, tol, label=f"{case.name} {backend}/{dtype} vs reference")


@pytest.mark.parametrize("case", _cases(OPTION_CASES))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float64_matches_reference(backend, case):
    _vs_reference(case, backend, torch.float64, torch.float64, TOL_F64)


@pytest.mark.parametrize("case", _cases(OPTION_CASES))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float32_matches_float64_reference(backend, case):
    _vs_reference(case, backend, torch.float32, torch.float64, TOL_F32)


@pytest.mark.heavy
@pytest.mark.parametrize("case", SUBSET_CASES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_level_subsets_float64(backend, case):
    _vs_reference(case, backend, torch.float64, torch.float64, TOL_F64)


# bfloat16: one bf16 ulp is 2**-8 relative; a parameter update of ~1 % of the parameter is
# rounded to a few bits, and two backends may round differently once their float32 sums
# differ in the last bit, so the comparison is loose.  Rates live in float32 and are driven
# by sums over many elements, so they agree much better than the parameters.
# (Measured with the torch backend: bf16 vs bf16 reference identical; vs float64 reference
# params 4e-2, rates 1e-4, weights 4e-4 apart -- while rates move ~5e-3 and weights ~0.1.)
TOL_BF16_SAME = Tol(rtol=1e-2, atol_param=2e-2, atol_rate=5e-5, atol_weight=1e-3)
TOL_BF16_F64 = Tol(rtol=5e-2, atol_param=8e-2, atol_rate=3e-4, atol_weight=2e-3)
BF16_CASES = [c for c in OPTION_CASES if c.bf16]


@pytest.mark.parametrize("case", BF16_CASES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bfloat16_matches_reference(backend, case):
    _vs_reference(case, backend, torch.bfloat16, torch.bfloat16, TOL_BF16_SAME)


@pytest.mark.parametrize("case", BF16_CASES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bfloat16_close_to_float64_reference(backend, case):
    _vs_reference(case, backend, torch.bfloat16, torch.float64, TOL_BF16_F64)
