"""What is specific to the Triton backend (the suite's other files cover it as one of the
fast backends): launch tables and launch counts, the reduction's tile classes on shapes
the suite's small set does not reach (long rows split into pieces, rows whose length is
not a multiple of 4, strided units, several chunks per tensor), half precision,
determinism, the non-finite skip, state dicts shared with the torch backend, fallbacks.

Runs on CUDA when the Triton kernels are compiled for it (MLHD_TEST_DEVICE=cuda), and on
the CPU under the Triton interpreter (conftest sets TRITON_INTERPRET=1), with tensors
small enough for the interpreter.
"""
import contextlib

import pytest
import torch

import multilevel_hd as mlhd
from cases import ALL_LEVELS, OPTION_CASES, SUBSET_CASES
from conftest import DEVICE
from multilevel_hd.backends import unavailable_reason
from trajectory import (TOL_F32, GradFn, Tol, assert_bitwise_equal_snapshots, assert_trajectories_close,
                        make_params, opt_class, run_case, run_optimizer)

if unavailable_reason("triton", DEVICE) is not None:
    pytest.skip(f"triton backend: {unavailable_reason('triton', DEVICE)}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from multilevel_hd.backends import triton_backend, triton_tables  # noqa: E402  (needs triton)

to_dtype = triton_tables.common.to_dtype

# Every tile class of the reduction and both step-chunk kinds (numel 5,834).
KERNEL_SHAPES = (
    ((), False),           # 0-d
    ((600,), False),       # 600 units of one element: three narrow reduction tiles
    ((3, 5), False),       # short rows
    ((2, 300), False),     # long rows, length % 4 == 0: two pieces per row (WIDE4)
    ((2, 257), False),     # long odd rows: two pieces (WIDE)
    ((3, 260), "t"),       # transposed: strided units of long rows
    ((2, 3, 2, 2), True),  # channels_last
    ((3, 1100), False),    # five pieces per row; one full and one partial step chunk
)
STEPS = 4  # rates and weights move from step 2 on
# The suite's hyper-gradient rates are tuned for ~160 elements; "size" scaling multiplies
# the finer levels' steps by N / N_k, so scale beta down to keep the dynamics comparable.
BETA_SCALE = 160 / sum(torch.Size(s).numel() for s, _ in KERNEL_SHAPES)


def _case(name):
    return next(c for c in OPTION_CASES + SUBSET_CASES if c.name == name)


def _extra(case):
    beta = case.kwargs.get("hypergrad_lr")
    if case.kwargs.get("hypergrad_rule") == "multiplicative" or beta is None:
        return {}
    if isinstance(beta, dict):
        return {"hypergrad_lr": {k: v * BETA_SCALE for k, v in beta.items()}}
    return {"hypergrad_lr": beta * BETA_SCALE}


def _run(case, backend, dtype, device=DEVICE, steps=STEPS, **kw):
    return run_case(case, backend, dtype, steps=steps, shapes=KERNEL_SHAPES, device=device,
                    extra={**_extra(case), **kw})


def _reference(case, steps=STEPS, **kw):
    return _run(case, "reference", torch.float64, device="cpu", steps=steps, **kw)


# One case per option (every base optimizer, rule, scaling, shrinkage parent, bound kind,
# decay, weight setting), plus level subsets that reach the param-only and single coarse
# level paths of the kernels.
OPTION_NAMES = [
    "sgd-default", "sgd-momentum-dampening", "sgd-nesterov", "sgd-weight-decay", "sgd-maximize",
    "sgd-multiplicative", "sgd-multiplicative-nesterov", "sgd-scaling-none", "sgd-combination-lr",
    "sgd-shrink-all", "sgd-shrink-param-to-layer", "sgd-shrink-param-to-global",
    "sgd-bounds-none", "sgd-bounds-lohi", "sgd-bounds-hi-only", "adam-default", "adam-weight-decay",
    "adam-decoupled", "adam-betas-eps", "adam-multiplicative", "adam-shrink", "adam-hd-decay",
    "adamw-maximize-mult", "adamw-hd-decay-shrink",
    "sgd-param", "adam-param", "adam-layer", "sgd-unit", "adamw-global+layer+unit+param",
]


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_float32_matches_float64_reference(name):
    case = _case(name)
    assert_trajectories_close(_run(case, "triton", torch.float32), _reference(case), TOL_F32, label=name)


def test_rows_of_many_pieces():
    """Rows of 8,500 elements: 34 reduction pieces each, added in two rounds by the finish."""
    case, shapes = _case("adam-multiplicative"), (((2, 8500), False), ((3,), False))
    got = run_case(case, "triton", torch.float32, steps=STEPS, shapes=shapes, device=DEVICE)
    ref = run_case(case, "reference", torch.float64, steps=STEPS, shapes=shapes)
    assert_trajectories_close(got, ref, TOL_F32, label="many pieces")


def test_skip_nonfinite_false_matches_reference():
    case = _case("adam-multiplicative")
    got = _run(case, "triton", torch.float32, skip_nonfinite=False)
    assert_trajectories_close(got, _reference(case, skip_nonfinite=False), TOL_F32, label="no guard")


@pytest.mark.parametrize("name", ["adam-default", "adam-multiplicative"])
def test_adam_without_eps_matches_reference(name):
    """eps=0 is a legal Adam option; the reduction's masked lanes (m = v = 0) must not
    compute u = 0/0 and poison the sums."""
    case = _case(name)
    got = _run(case, "triton", torch.float32, eps=0.0)
    assert_trajectories_close(got, _reference(case, eps=0.0), TOL_F32, label="eps=0")


def test_integer_rate_bounds_act_as_floats():
    """Python ints in rate_bounds reach the kernels as float32 (as int arguments Triton
    would compile them as i32/i64, specialise 1 as a constant, and reject 2**70)."""
    case = _case("sgd-bounds-lohi")
    runs = [_run(case, "triton", torch.float32, rate_bounds=bounds, steps=3) for bounds in ((0, 2**70), (0.0, 2.0**70))]
    assert_bitwise_equal_snapshots(*runs)


# Half precision: parameters and gradients in 16 bits, state and rates in float32. Both
# backends round the parameters once per step, so they agree to an ulp or so; against the
# float64 reference the 16-bit parameters drift further (see test_backends.py).
TOL_HALF_SAME = Tol(rtol=1e-2, atol_param=2e-2, atol_rate=5e-5, atol_weight=1e-3)
TOL_HALF_F64 = Tol(rtol=5e-2, atol_param=8e-2, atol_rate=3e-4, atol_weight=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["adam-default", "sgd-nesterov", "adam-multiplicative", "sgd-shrink-all"])
def test_half_precision(name, dtype):
    case = _case(name)
    got = _run(case, "triton", dtype)
    assert_trajectories_close(got, _run(case, "torch", dtype), TOL_HALF_SAME, label=f"{name} vs torch")
    assert_trajectories_close(got, _reference(case), TOL_HALF_F64, label=f"{name} vs reference")


@triton.jit
def _to_bfloat16_kernel(src, dst, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(dst + i, to_dtype(tl.load(src + i, mask=i < n), tl.bfloat16), mask=i < n)


def test_bfloat16_rounding_keeps_nan():
    """The step kernel's float32 -> bfloat16 rounding (by hand: see kernels/common.py)
    rounds to nearest even as torch does, and keeps a NaN a NaN (skip_nonfinite=False
    lets one reach it): adding the rounding bias carried a GPU's canonical NaN
    0x7FFFFFFF into the sign bit (-0.0), and 0x7F800001 became +Inf."""
    bits = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000, 0xFFC00000, 0x7F807FFF,  # NaNs
            0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000000, 0x80000000, 0x00000001,  # inf, max, 0, tiny
            0x3F808000, 0x3F818000, 0x3F808001, 0xBF80FFFF]  # ties to even, above a tie, a carry
    x = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).to(DEVICE)
    out = torch.empty(len(bits), dtype=torch.bfloat16, device=DEVICE)
    _to_bfloat16_kernel[(1,)](x, out, len(bits), BLOCK=triton.next_power_of_2(len(bits)))
    nan = x.isnan()
    assert out.isnan().tolist() == nan.tolist()
    assert torch.equal(out[~nan].view(torch.int16), x[~nan].to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reruns_are_bit_identical(dtype):
    case = _case("adam-multiplicative")  # every level, all three sums, the param partials
    assert_bitwise_equal_snapshots(_run(case, "triton", dtype), _run(case, "triton", dtype))


def _tiny_params(count):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 3), (2, 300)]
    return [torch.randn(shapes[i % 3], generator=gen).to(DEVICE).requires_grad_() for i in range(count)]


def _step_with_grads(opt, params, seed):
    """New gradient tensors, drawn on the device (a host-to-device copy would synchronise)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=DEVICE, dtype=p.dtype)
    opt.step()


def test_launch_count_does_not_grow_with_tensors():
    counts = []
    for count in (10, 300):
        params = _tiny_params(count)
        opt = mlhd.MultiLevelAdam(params, levels=ALL_LEVELS, backend="triton")
        _step_with_grads(opt, params, 0)
        counts.append(triton_backend.launches_last_step)
    assert counts[0] == counts[1] == 5  # reduce, finish, level stage (2), step


def test_one_launch_pair_per_dtype():
    """A group mixing dtypes runs one reduction and one step launch per dtype (plus the
    finish and the two level-stage launches)."""
    gen = torch.Generator().manual_seed(0)
    shapes_dtypes = [((4, 5), torch.float32), ((3, 300), torch.bfloat16), ((7,), torch.float16)]
    base = [torch.randn(s, generator=gen).to(dt) for s, dt in shapes_dtypes]
    runs = {}
    for backend in ("triton", "torch"):
        params = [b.clone().to(DEVICE).requires_grad_() for b in base]
        opt = mlhd.MultiLevelSGD(params, lr=0.05, momentum=0.9, levels=ALL_LEVELS, backend=backend)
        for seed in range(3):
            _step_with_grads(opt, params, seed)
        runs[backend] = [p.detach().float().cpu() for p in params]
    assert triton_backend.launches_last_step == 2 * 3 + 1 + 2
    for a, b in zip(runs["triton"], runs["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_pointer_rows_upload_only_when_addresses_change(monkeypatch):
    uploads = []
    original = triton_tables.GroupTables._upload

    def record(self, role, addresses):
        uploads.append(role)
        original(self, role, addresses)

    monkeypatch.setattr(triton_tables.GroupTables, "_upload", record)
    params = _tiny_params(4)
    opt = mlhd.MultiLevelAdam(params, levels=ALL_LEVELS, backend="triton")
    _step_with_grads(opt, params, 0)
    assert sorted(uploads) == list(range(triton_tables.NUM_ROLES))  # first step: every row
    uploads.clear()
    for seed in (1, 2):  # zero_grad(set_to_none=True): new gradient tensors every step
        opt.zero_grad(set_to_none=True)
        _step_with_grads(opt, params, seed)
    assert uploads == [triton_tables.ROLE_GRAD] * 2
    uploads.clear()
    for p in params:  # gradients accumulated in place: same addresses, nothing to upload
        p.grad.mul_(0.5)
    opt.step()
    assert uploads == []
    (tables,) = [v for v in opt._plans[0]._device_cache.values() if isinstance(v, triton_tables.GroupTables)]
    assert tables.pointers[triton_tables.ROLE_GRAD].tolist() == [p.grad.data_ptr() for p in params]


def test_table_upload_inside_a_graph_capture_raises(monkeypatch):
    """A CUDA graph would capture a pointer-table upload from a host buffer that is reused
    after the capture; a step that needs one while capturing raises instead. Here the
    capture is pretended (the CPU has none); tests/test_cuda_graphs.py captures for real."""
    params = _tiny_params(3)
    opt = mlhd.MultiLevelAdam(params, levels=ALL_LEVELS, backend="triton")
    monkeypatch.setattr(triton_tables, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="first step inside a CUDA graph capture"):
        _step_with_grads(opt, params, 0)
    monkeypatch.setattr(triton_tables, "_capturing", lambda device: False)
    _step_with_grads(opt, params, 0)  # eager warm-up
    monkeypatch.setattr(triton_tables, "_capturing", lambda device: True)
    for p in params:  # zero_grad(set_to_none=False) and backward: the same gradient tensors
        p.grad.mul_(0.5)
    opt.step()
    with pytest.raises(RuntimeError, match=r"new gradient tensors .*zero_grad\(set_to_none=False\)"):
        opt.zero_grad(set_to_none=True)
        _step_with_grads(opt, params, 1)


def _all_tensors(opt):
    """Every tensor a step may write, but the skip counter."""
    out = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    out += [v.clone() for st in opt.state.values() for v in st.values()]
    out += [v.clone() for gs in opt.group_states for k, v in gs.items() if k != "skipped"]
    return out


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_step_leaves_every_tensor_bit_identical(poison):
    params = make_params(torch.float32, DEVICE, 0, KERNEL_SHAPES)
    opt = mlhd.MultiLevelAdam(params, lr=0.01, levels=ALL_LEVELS, backend="triton")
    grads = GradFn(KERNEL_SHAPES, poison={(3, 7): poison})  # the 3,300-element tensor
    run_optimizer(opt, grads, 3)
    before = _all_tensors(opt)
    run_optimizer(opt, grads, 1, start=3)
    after = _all_tensors(opt)
    assert opt.skipped_steps() == [1]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    run_optimizer(opt, grads, 1, start=4)  # the next finite step proceeds
    assert not torch.equal(before[0], params[0].detach())


def test_state_dict_moves_between_triton_and_torch():
    case = _case("sgd-shrink-all")
    straight = _run(case, "triton", torch.float32, steps=6)
    for first, second in (("triton", "torch"), ("torch", "triton")):
        params = make_params(torch.float32, DEVICE, 0, KERNEL_SHAPES)
        kwargs = {**case.kwargs, **_extra(case)}
        opt = opt_class(case.cls)(params, backend=first, **kwargs)
        grads = GradFn(KERNEL_SHAPES, 0, sign=case.sign, noise=case.noise)
        head = run_optimizer(opt, grads, 3)
        resumed = opt_class(case.cls)(params, backend=second, **kwargs)
        resumed.load_state_dict(opt.state_dict())
        tail = run_optimizer(resumed, grads, 3, start=3)
        assert_trajectories_close(head + tail, straight, TOL_F32, label=f"{first} -> {second}")


def test_float64_steps_with_the_torch_backend(monkeypatch):
    monkeypatch.setattr(triton_backend, "_warned", set())
    case = _case("adam-multiplicative")
    with pytest.warns(UserWarning, match="float64"):
        got = _run(case, "triton", torch.float64, steps=3)
    assert triton_backend.launches_last_step == 0
    assert_bitwise_equal_snapshots(got, _run(case, "torch", torch.float64, steps=3))


def test_non_dense_parameter_steps_with_the_torch_backend(monkeypatch):
    monkeypatch.setattr(triton_backend, "_warned", set())
    results = []
    for backend in ("triton", "torch"):
        p = torch.arange(24.0).reshape(4, 6).to(DEVICE)[:, :3].requires_grad_()  # a slice: not dense
        opt = mlhd.MultiLevelSGD([p], lr=0.1, backend=backend)
        p.grad = torch.ones(4, 3, device=DEVICE)
        with pytest.warns(UserWarning, match="dense") if backend == "triton" else contextlib.nullcontext():
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)


def test_gradient_differing_only_in_size_one_strides_steps_with_triton(monkeypatch):
    """A gradient whose strides differ from its parameter's only in a size-1 dimension has
    every element at the same offset (csrc/ops.cpp same_layout's rule): no fallback."""
    monkeypatch.setattr(triton_backend, "_warned", set())
    results = {}
    for backend in ("triton", "torch"):
        p = torch.arange(12.0).reshape(4, 1, 3).to(DEVICE).requires_grad_()  # strides (3, 3, 1)
        opt = mlhd.MultiLevelAdam([p], lr=0.1, backend=backend)
        for step in range(3):
            p.grad = torch.empty_strided((4, 1, 3), (3, 7, 1), device=DEVICE)
            p.grad.copy_(torch.linspace(-1.0, 1.0 + step, 12).reshape(4, 1, 3))
            opt.step()
            if backend == "triton":
                assert triton_backend.launches_last_step > 0  # 0: it fell back to torch
        results[backend] = p.detach()
    torch.testing.assert_close(results["triton"], results["torch"])


def test_unavailable_reason_is_a_sentence():
    assert triton_backend.unavailable_reason(DEVICE) is None
    assert "Triton" in triton_backend.unavailable_reason(torch.device("meta"))


cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs the compiled kernels on a GPU")


@cuda_only
def test_steps_need_no_host_sync():
    params = _tiny_params(6)
    opt = mlhd.MultiLevelAdam(params, levels=ALL_LEVELS, backend="triton")
    _step_with_grads(opt, params, 0)  # builds the plan's tables (blocking uploads, once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in (1, 2):  # new gradient tensors: the pointer row is re-uploaded
            _step_with_grads(opt, params, seed)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The float32 spacing at |x|."""
    x = x.abs().float()
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


@cuda_only
def test_plain_adam_on_an_odd_size_matches_fused_torch_adam_within_ulps():
    """hypergrad_lr=0: the rates never move, so this is torch.optim.Adam, here its fused
    CUDA kernel, on apex's odd 278,011 elements plus a matrix of long rows (tails, several
    chunks, long pieces).

    Both compute IEEE-rounded float32 (the PTX test checks ours) by different formulas:
    (m / bc1) / (sqrt(v / bc2) + eps) against (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),
    the moments in float32 against double, and kappa = 0.8 lr + 0.2 lr against lr. So a
    step may differ by one rounding of p and a few of the update (|update| <= ~lr):
    at most 4 ulp of max(|p|, lr) per step. Under the interpreter on the CPU, against the
    CPU fused kernel, the worst after 5 steps is 7."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(278_011, generator=gen), torch.randn(64, 4_700, generator=gen)]
    lr, steps = 1e-3, 5
    runs = []
    for make in (
        lambda ps: mlhd.MultiLevelAdam(ps, lr=lr, hypergrad_lr=0.0, backend="triton"),
        lambda ps: torch.optim.Adam(ps, lr=lr, fused=True),
    ):
        params = [b.clone().to(DEVICE).requires_grad_() for b in base]
        opt = make(params)
        for seed in range(steps):
            _step_with_grads(opt, params, seed)
        runs.append([p.detach().cpu() for p in params])
    for ours, fused in zip(*runs):
        ulps = (ours - fused).abs() / _ulp(fused.abs().clamp(min=lr))
        assert ulps.max() <= 4 * steps, f"{ulps.max():.0f} ulp apart"
