"""Hazards that only a GPU shows, each a test that `bash bench/gpu_check.sh` runs on CUDA
(MLHD_TEST_DEVICE=cuda). Where the logic of a test can run on the CPU too it does (every
fast backend, small sizes), so CI proves the test itself before a GPU runs it; the
CUDA-only ones skip here with their reason.

* A parameter (and its gradient) that is a view at an odd element offset: no 16-byte
  alignment, so a kernel that vectorises must notice and take its scalar path.
* Tensors past 2**31 elements: every index in the kernels must be 64-bit.
* A whole training iteration (zero_grad, forward, backward, step) captured in one CUDA
  graph and replayed, as PyTorch's whole-network capture does.
"""
from __future__ import annotations

import pytest
import torch

import multilevel_hd as mlhd
from conftest import DEVICE, FAST_BACKENDS, shapes_for
from trajectory import TOL_F32, GradFn, Tol, assert_trajectories_close, make_params, run_optimizer

ALL_LEVELS = ("global", "layer", "unit", "param")
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda",
                               reason="needs a CUDA device (MLHD_TEST_DEVICE=cuda, as bench/gpu_check.sh sets)")
KERNEL_BACKENDS = [b for b in FAST_BACKENDS if b in ("triton", "cuda")]  # the fused kernels


# ------------------------------------------------------------------------------ misaligned views
def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` with its strides, one element into a fresh buffer: its address is
    2 or 4 bytes past a 16-byte boundary (the caching allocator aligns every buffer)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf.as_strided(t.shape, t.stride(), storage_offset=1)
    out.copy_(t.detach())
    return out


class MisalignedGrads(GradFn):
    def grad(self, step, i, p):
        g = super().grad(step, i, p)
        return None if g is None else misaligned_copy(g)


# bf16: the loose tolerance of test_backends.py (bf16 backend against the bf16 reference).
TOL_BF16 = Tol(rtol=1e-2, atol_param=2e-2, atol_rate=5e-5, atol_weight=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_misaligned_views_match_reference(backend, dtype):
    shapes = shapes_for(backend)
    params = [misaligned_copy(p).requires_grad_() for p in make_params(dtype, DEVICE, 0, shapes)]
    assert all(p.data_ptr() % 16 for p in params if p.numel())
    kwargs = dict(lr=0.01, hypergrad_lr=1e-3, levels=ALL_LEVELS)
    got = run_optimizer(mlhd.MultiLevelAdam(params, backend=backend, **kwargs), MisalignedGrads(shapes), 6)
    assert all(p.data_ptr() % 16 for p in params if p.numel())  # stepped in place, still misaligned
    ref_params = make_params(torch.float64 if dtype == torch.float32 else dtype, "cpu", 0, shapes)
    want = run_optimizer(mlhd.MultiLevelAdam(ref_params, backend="reference", **kwargs), GradFn(shapes), 6)
    assert_trajectories_close(got, want, TOL_F32 if dtype == torch.float32 else TOL_BF16,
                              label=f"misaligned {backend}/{dtype}")


# ------------------------------------------------------------------------- past 2**31 elements
BIG_ROW = 2**30 + 1  # two rows: 2**31 + 2 elements, the second row reaches past index 2**31


def two_row_check(backend: str, row_len: int, device) -> None:
    """A bf16 tensor of two rows, gradient +1 on the first and -1 on the second: after two
    Adam steps at lr 2**-7 (rates moved by at most 1e-6, the multiplicative rule's bound)
    every element of row 0 is exactly -2**-6 and of row 1 exactly +2**-6. An index that
    wraps at 2**31 reads or writes the wrong row, or leaves a tail unwritten."""
    p = torch.zeros(2, row_len, dtype=torch.bfloat16, device=device, requires_grad=True)
    g = torch.empty_like(p, requires_grad=False)
    g[0].fill_(1.0)
    g[1].fill_(-1.0)
    opt = mlhd.MultiLevelAdam([p], lr=2**-7, backend=backend, levels=("global", "layer", "unit"),
                              hypergrad_rule="multiplicative", hypergrad_lr=1e-6)
    for _ in range(2):
        p.grad = g
        opt.step()
    if backend == "triton":  # it steps groups it cannot address with the torch backend
        from multilevel_hd.backends import triton_backend
        assert triton_backend.launches_last_step > 0, "the triton backend fell back to the torch backend"
    assert opt.skipped_steps() == [0]
    for row, want in ((0, -(2**-6)), (1, 2**-6)):
        wrong = int((p[row] != want).sum())
        assert wrong == 0, f"{backend}: {wrong} elements of row {row} are not {want}"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_two_row_check_on_small_rows(backend):
    """The logic of the 2**31 test on rows of 1025 elements, on every device."""
    two_row_check(backend, 1025, DEVICE)


@cuda_only
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tensor_past_2_31_elements(backend):
    # p and g in bf16 (4 GiB each), Adam's m and v in float32 (8 GiB each), and a quarter
    # more for the launch tables and the checks' masks
    need = int(2 * BIG_ROW * (2 + 2 + 4 + 4) * 1.25)
    free, _ = torch.cuda.mem_get_info(DEVICE)
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    try:
        two_row_check(backend, BIG_ROW, DEVICE)
    finally:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ whole-iteration CUDA graph
WARMUP, REPLAYS = 3, 5


def _model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)).to(DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 24, generator=gen).to(DEVICE), torch.randint(0, 5, (16,), generator=gen).to(DEVICE))
               for _ in range(WARMUP + REPLAYS)]
    return model, batches


def _iteration(model, opt, x, y):
    # set_to_none=False: the gradients keep their addresses, so the pointer tables the
    # warm-up uploaded stay valid in the graph (a step that would have to upload new
    # addresses while capturing cannot: that is refused, not recorded)
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _state(model, opt) -> list:
    out = [p.detach().clone() for p in model.parameters()]
    for r in opt.rates():
        out += [r["weights"]] + [x for k, v in r.items() if k != "weights"
                                 for x in (v if isinstance(v, list) else [v])]
    return out


@cuda_only
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_whole_iteration_capture_replays_like_eager(backend):
    """torch.cuda.graphs' whole-network recipe: warm up on a side stream, capture
    zero_grad + forward + backward + step, replay on new data copied into static inputs;
    every replay equals an eager iteration of a twin model on the same batch."""
    kwargs = dict(lr=0.01, hypergrad_lr=1e-3, levels=ALL_LEVELS, backend=backend)
    graphed, batches = _model_and_batches()
    eager, _ = _model_and_batches()
    g_opt, e_opt = mlhd.MultiLevelAdam(graphed.parameters(), **kwargs), mlhd.MultiLevelAdam(eager.parameters(), **kwargs)
    static_x, static_y = (t.clone() for t in batches[0])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:WARMUP]:
            static_x.copy_(x)
            static_y.copy_(y)
            _iteration(graphed, g_opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:WARMUP]:
        _iteration(eager, e_opt, x, y)

    graph = torch.cuda.CUDAGraph()
    before = _state(graphed, g_opt)
    with torch.cuda.graph(graph):
        _iteration(graphed, g_opt, static_x, static_y)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(graphed, g_opt))), "capture ran the kernels"

    for k, (x, y) in enumerate(batches[WARMUP:]):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        _iteration(eager, e_opt, x, y)
        for i, (a, b) in enumerate(zip(_state(graphed, g_opt), _state(eager, e_opt), strict=True)):
            # forward and backward may pick other cuBLAS kernels in a graph: close, not equal
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{backend}: replay {k}, tensor {i}: {m}")
    moved = [not torch.equal(a, b) for a, b in zip(before, _state(graphed, g_opt))]
    num_params = len(list(graphed.parameters()))
    assert all(moved[:num_params]) and any(moved[num_params:]), "parameters and rates must move in the replays"
    assert g_opt.skipped_steps() == [0]
