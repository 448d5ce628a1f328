"""Two identical runs give bit-identical results, for every fast backend."""
import pytest
import torch

import multilevel_hd as mlhd

from cases import LIGHT_CASE_NAMES, OPTION_CASES
from conftest import DEVICE, FAST_BACKENDS, is_slow, shapes_for
from trajectory import assert_bitwise_equal_snapshots, run_case

CASES = [c for c in OPTION_CASES if c.name in LIGHT_CASE_NAMES | {"adam-multiplicative",
                                                                  "adamw-hd-decay-shrink"}]


# A slow backend (triton in its numpy interpreter, deterministic by construction and 10-100x
# slower than the others) reruns two cases: nothing in the driver (tables, scratch buffers)
# may carry over between runs. MLHD_TEST_FULL=1 runs every case on every backend.
RUNS = [(b, c, d) for b in ["reference"] + FAST_BACKENDS for c in CASES
        for d in (torch.float32, torch.bfloat16)
        if not is_slow(b) or (d == torch.float32 and c.name in ("adam-multiplicative", "adamw-hd-decay-shrink"))]


@pytest.mark.parametrize("backend,case,dtype", RUNS, ids=lambda v: str(v).replace("torch.", ""))
def test_identical_runs_are_bit_identical(backend, case, dtype):
    dev = "cpu" if backend == "reference" else DEVICE
    a = run_case(case, backend, dtype, shapes=shapes_for(backend), device=dev)
    b = run_case(case, backend, dtype, shapes=shapes_for(backend), device=dev)
    assert_bitwise_equal_snapshots(a, b, label=f"{case.name} {backend} {dtype}")


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b in ("torch", "cpp")])
def test_thread_count_does_not_change_a_step(backend):
    """More units than one thread reduces alone (torch splits sums above 32,768 elements):
    the level sums, hence rates and weights, must not depend on the thread count."""
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(40_000, 3, generator=gen), torch.randn(50_000, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(3)]
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ps = [p.clone().requires_grad_() for p in init]
            opt = mlhd.MultiLevelAdam(ps, levels=("global", "layer", "unit"), hypergrad_rule="additive", hypergrad_lr=1e-6,
                                      combination_lr=1e3, backend=backend)
            for step_grads in grads:
                for p, g in zip(ps, step_grads):
                    p.grad = g
                opt.step()
            rates = opt.rates()[0]
            results.append([rates["weights"], rates["global"], *rates["layer"], *rates["unit"], *ps])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
