"""Two identical runs give bit-identical results, for every fast backend."""
import pytest
import torch

from cases import LIGHT_CASE_NAMES, OPTION_CASES
from conftest import DEVICE, FAST_BACKENDS, shapes_for
from trajectory import assert_bitwise_equal_snapshots, run_case

CASES = [c for c in OPTION_CASES if c.name in LIGHT_CASE_NAMES | {"adam-multiplicative",
                                                                  "adamw-hd-decay-shrink"}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_identical_runs_are_bit_identical(backend, case, dtype):
    dev = "cpu" if backend == "reference" else DEVICE
    a = run_case(case, backend, dtype, shapes=shapes_for(backend), device=dev)
    b = run_case(case, backend, dtype, shapes=shapes_for(backend), device=dev)
    assert_bitwise_equal_snapshots(a, b, label=f"{case.name} {backend} {dtype}")
