"""The fast level stages against the shared torch stage `multilevel_hd.levels.update_levels`,
called directly on the same random inputs: random unit sums and group state, plans with
tensors without gradients and 0-d/1-D/2-D/4-D tensors (and a group of 1,142 layers and
108,801 units), every level subset and option that changes the stage's math. Outputs (the
group state updated in place and the coefficients the apply pass reads) must agree to float
rounding; two calls are bit-identical, and so are the emulated CUDA stage's in every thread
and block order.

Stages: the triton backend's (`triton_backend.level_stage`, two launches of
`kernels/level_stage.py`; under the Triton interpreter on the CPU, conftest sets
TRITON_INTERPRET=1) and the compiled backends' (`cpp_backend.level_stage`, the `levels` op:
csrc/cpu/levels.cpp for "cpp", csrc/cuda/levels.cu for "cuda"; float32 and float64).
"""
import copy
import itertools

import pytest
import torch

import multilevel_hd as mlhd
from conftest import DEVICE
from multilevel_hd.backends import cpp_backend, cuda_backend, unavailable_reason
from multilevel_hd.hierarchy import GroupLayout, StepPlan
from multilevel_hd.levels import UnitSums, update_levels
from multilevel_hd.options import resolve
from multilevel_hd.state import GroupJob, new_group_state

# the interpreter computes both sides of a `where` (a 0/0 it then discards)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in (divide|multiply):RuntimeWarning")

if unavailable_reason("triton", DEVICE) is None:
    from multilevel_hd.backends import triton_backend
else:
    triton_backend = None
# (stage, state dtype, why it cannot run here): every stage in float32, the compiled ones in
# float64 too
STAGES = {
    "triton": (triton_backend and triton_backend.level_stage, torch.float32,
               unavailable_reason("triton", DEVICE)),
    "cpp": (cpp_backend.level_stage, torch.float32, unavailable_reason("cpp", DEVICE)),
    "cpp-float64": (cpp_backend.level_stage, torch.float64, unavailable_reason("cpp", DEVICE)),
    "cuda": (cuda_backend.level_stage, torch.float32, unavailable_reason("cuda", DEVICE)),
    "cuda-float64": (cuda_backend.level_stage, torch.float64, unavailable_reason("cuda", DEVICE)),
}
# relative tolerance of a stage against the torch stage, per state dtype (sums in other orders)
RTOL = {torch.float32: 2e-6, torch.float64: 1e-13}


needs_triton = pytest.mark.skipif(triton_backend is None, reason=f"triton: {STAGES['triton'][2]}")


@pytest.fixture(params=list(STAGES))
def stage(request):
    fn, dtype, reason = STAGES[request.param]
    if reason is not None:
        pytest.skip(f"{request.param}: {reason}")
    return fn, dtype


ALL = ("global", "layer", "unit", "param")
# (shapes, indices of the tensors with a gradient)
PLAN_MIXED = (((3,), (), (2, 4), (2, 1, 2, 2), (5, 3), (4,)), (0, 2, 4))  # 0-d and 4-D without grad
PLAN_ALL = (((), (3,), (2, 4), (2, 1, 2, 2)), (0, 1, 2, 3))
PLAN_ONE = (((6, 2),), (0,))
# 2,140 units in 1,024-unit blocks (three programs), a layer longer than one block
PLAN_WIDE = (((1100,), (3, 2), (1030, 2), (7,)), (0, 1, 2))
# 1,142 layers (40 empty, one of 30,000 units, every 97th without gradient) and 108,801 units:
# several blocks in each launch of the CUDA stage, and several of the chunks in which it
# stages the layers' sums for the group's sums
_LARGE_SHAPES = ((97, 3),) * 800 + ((0, 4),) * 40 + ((5,),) * 200 + ((), (30000, 2)) + ((2, 1, 3, 2),) * 100
PLAN_LARGE = (_LARGE_SHAPES, tuple(i for i in range(len(_LARGE_SHAPES)) if i % 97 != 5))
LR = 0.01


def _options(levels, lr_scale=1.0, **kw):
    """GroupOptions as the optimizer resolves them (the additive rule unless kw names one)."""
    kw.setdefault("hypergrad_rule", "additive")
    multiplicative = kw["hypergrad_rule"] == "multiplicative"
    if kw.get("hypergrad_lr") is None:
        kw["hypergrad_lr"] = 0.05 if multiplicative else 2e-3
    kw.setdefault("combination_lr", 0.5 if multiplicative else 20.0)
    opt = mlhd.MultiLevelSGD([torch.zeros(2, requires_grad=True)], lr=LR, levels=levels, backend="torch", **kw)
    group = opt.param_groups[0]
    group["lr"] = LR * lr_scale  # an LR scheduler's factor: lr / initial_lr
    return resolve(group, "sgd")


def _inputs(opts, plan_spec, seed=0, t_old=3.0, finite=True, found_inf=None, zero_q=False, nan=False,
            dtype=torch.float32):
    """A random job (group state, as after some steps, in `dtype`) and random unit sums."""
    gen = torch.Generator().manual_seed(seed)
    shapes, active = plan_spec
    layout = GroupLayout.of([torch.empty(s) for s in shapes])
    plan = StepPlan(layout, active)
    gs = new_group_state(opts, layout, "cpu", torch.float32)

    def rand(*shape, lo=0.5, hi=1.5):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    gs["step"].fill_(t_old)
    gs["skipped"].fill_(2)
    gs["lr_scale"].fill_(float(rand(1, lo=0.5, hi=2.0)))
    w = rand(len(opts.levels))
    gs["weights"].copy_(w / w.sum())
    for key in ("rate_global", "rate_layer", "rate_unit"):
        if key in gs:
            gs[key].copy_(LR * rand(*gs[key].shape))
    gs["applied_scale"].copy_(rand(*gs["applied_scale"].shape))
    gs["applied_offset"].copy_(LR * rand(*gs["applied_offset"].shape))
    units = layout.num_units
    # (the reduction leaves the units of tensors without gradient at 0; random here: both
    # stages must treat any input alike, and their rates must not move anyway)
    sums = UnitSums(s=torch.randn(units, generator=gen), finite=torch.tensor(finite))
    if opts.rule == "multiplicative":
        sums.qg, sums.qu = rand(units, lo=0.0, hi=4.0), rand(units, lo=0.0, hi=4.0)
        if zero_q:  # the cosine is 0 where Qg * Qu is 0
            sums.qg[::3] = 0.0
            sums.qu[1::4] = 0.0
    if "param" in opts.levels and opts.multi_level:
        sums.param_dot, sums.param_sq = torch.randn((), generator=gen) * LR, rand(1, lo=0.0, hi=1.0)[0] * LR**2
    if nan:
        sums.s[1] = float("nan")
    def to(v):
        return v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE)

    gs = {k: to(v) for k, v in gs.items()}
    sums = UnitSums(**{k: None if v is None else to(v) for k, v in vars(sums).items()})
    if found_inf is not None:
        found_inf = torch.tensor(found_inf, device=DEVICE)
    return GroupJob(opts, plan, [], [], [], gs, found_inf=found_inf), sums


def _run(stage, job, sums):
    """Run `stage` on a copy of the job's group state; (group state, coefficients), on the CPU."""
    job = copy.copy(job)
    job.group_state = {k: v.clone() for k, v in job.group_state.items()}
    coeffs = stage(job, sums)
    out = {f"coeffs.{k}": v.clone().cpu() for k, v in vars(coeffs).items() if v is not None}
    out.update({k: v.cpu() for k, v in job.group_state.items()})
    return out


def _assert_matches(stage, job, sums):
    want = _run(update_levels, job, sums)
    got = _run(stage, job, sums)
    assert sorted(got) == sorted(want)
    for key, ref in want.items():
        val = got[key]
        assert val.shape == ref.shape and val.dtype == ref.dtype, key
        if key in ("step", "skipped", "coeffs.gate", "coeffs.hd_gate"):
            assert torch.equal(val, ref), (key, val, ref)
        else:  # rounding, relative to the tensor's magnitude
            scale = ref[ref.isfinite()].abs().max().item() if ref.isfinite().any() else 0.0
            rtol = RTOL[ref.dtype]
            torch.testing.assert_close(val, ref, rtol=rtol, atol=rtol / 10 * scale, equal_nan=True,
                                       msg=lambda m: f"{key}: {m}")
    return want, got


SUBSETS = [levels for r in range(1, 5) for levels in itertools.combinations(ALL, r)]


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
@pytest.mark.parametrize("levels", SUBSETS, ids="+".join)
def test_level_subsets(stage, levels, rule):
    opts = _options(levels, hypergrad_rule=rule)
    job, sums = _inputs(opts, PLAN_MIXED, seed=len(levels), dtype=stage[1])
    want, _ = _assert_matches(stage[0], job, sums)
    before = job.group_state
    for key in ("rate_global", "rate_layer", "rate_unit"):  # not vacuous: the rates moved
        if key in want:
            assert not torch.allclose(want[key], before[key].cpu(), rtol=1e-4, atol=0), key
    if len(levels) > 1:
        assert not torch.allclose(want["weights"], before["weights"].cpu(), rtol=1e-4, atol=0)


OPTION_CASES = {
    # scaling, shrinkage on each level toward each possible parent (both lerp formulas)
    "scaling-none": dict(levels=ALL, hypergrad_scaling="none"),
    "shrink-layer": dict(levels=ALL, shrinkage={"layer": 0.3}),
    "shrink-unit-to-layer": dict(levels=ALL, shrinkage={"unit": 0.7}),
    "shrink-unit-to-global": dict(levels=("unit", "global"), shrinkage={"unit": 0.4}),
    "shrink-param-to-unit": dict(levels=ALL, shrinkage={"param": 0.3}),
    "shrink-param-to-layer": dict(levels=("param", "layer"), shrinkage={"param": 0.6}),
    "shrink-param-to-global": dict(levels=("global", "param"), shrinkage={"param": 0.5}),
    "shrink-all": dict(levels=("param", "layer", "unit", "global"),
                       shrinkage={"layer": 0.5, "unit": 0.2, "param": 0.8}),
    "shrink-all-mult": dict(levels=ALL, shrinkage={"layer": 0.6, "unit": 0.3, "param": 0.2},
                            hypergrad_rule="multiplicative"),
    # rate bounds: the default (0, None) binds with big steps; None; (lo, hi); (None, hi)
    "bounds-default-binds": dict(levels=ALL, hypergrad_lr=2e-2),
    "bounds-none": dict(levels=ALL, rate_bounds=None, hypergrad_lr=2e-2),
    "bounds-lohi": dict(levels=ALL, rate_bounds=(0.008, 0.0115)),
    "bounds-hi-only": dict(levels=ALL, rate_bounds=(None, 0.0105), hypergrad_lr=2e-2),
    "bounds-lohi-mult": dict(levels=ALL, rate_bounds=(0.0095, 0.0105), hypergrad_rule="multiplicative"),
    # annealing, an LR scheduler's factor, per-level betas, weights collapsing to uniform
    "hd-decay": dict(levels=ALL, hd_decay=0.05, final_lr=0.003),
    "hd-decay-mult": dict(levels=("global", "unit"), hd_decay=0.2, hypergrad_rule="multiplicative"),
    "hd-decay-no-unit": dict(levels=("global", "layer", "param"), hd_decay=0.05, final_lr=0.003, lr_scale=0.7),
    "lr-scale": dict(levels=ALL, lr_scale=0.3),
    "lr-scale-decay-mult": dict(levels=ALL, lr_scale=2.5, hd_decay=0.1, hypergrad_rule="multiplicative"),
    "beta-per-level": dict(levels=ALL, hypergrad_lr={"global": 1e-3, "layer": 0.0, "unit": 5e-3, "param": 1e-4}),
    "weights-all-zero": dict(levels=("global", "layer"), combination_lr=1e6),
    "weights-one-zero-mult": dict(levels=ALL, hypergrad_rule="multiplicative", combination_lr=0.99),
    "no-weight-motion": dict(levels=ALL, combination_lr=0.0),
}


@pytest.mark.parametrize("name", OPTION_CASES)
def test_options(stage, name):
    kw = dict(OPTION_CASES[name])
    opts = _options(kw.pop("levels"), **kw)
    job, sums = _inputs(opts, PLAN_MIXED, seed=7, zero_q=True, dtype=stage[1])
    want, _ = _assert_matches(stage[0], job, sums)
    if name == "weights-all-zero":  # not vacuous: the clamped weights summed to 0
        assert torch.equal(want["weights"], torch.full((2,), 0.5))
    if name == "bounds-default-binds":
        assert (want["rate_unit"] == 0).any()


GATES = {  # (t before the step, finite flag, found_inf, skip_nonfinite) -> the gate and t >= 2
    "t1": (0.0, True, None, True),
    "t2": (1.0, True, None, True),
    "nonfinite": (4.0, False, None, True),
    "nonfinite-t1": (0.0, False, None, True),
    "found-inf": (4.0, True, 1.0, True),
    "found-inf-zero": (4.0, True, 0.0, True),
    "found-inf-no-guard": (4.0, True, 2.0, False),
    "nonfinite-no-guard": (4.0, False, 0.0, False),
}


# the param level's shrinkage parent: the value handed to the step pass depends on the gates
PARAM_PARENTS = {"unit": ALL, "layer": ("global", "layer", "param"), "global": ("global", "param")}


@pytest.mark.parametrize("parent", PARAM_PARENTS)
@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
@pytest.mark.parametrize("name", GATES)
def test_gates(stage, name, rule, parent):
    t_old, finite, found_inf, guard = GATES[name]
    levels = PARAM_PARENTS[parent]
    opts = _options(levels, hypergrad_rule=rule, skip_nonfinite=guard,
                    shrinkage={"param": 0.3, "unit": 0.2} if "unit" in levels else {"param": 0.3})
    job, sums = _inputs(opts, PLAN_MIXED, seed=3, t_old=t_old, finite=finite, found_inf=found_inf, dtype=stage[1])
    want, got = _assert_matches(stage[0], job, sums)
    gate = (finite or not guard) and not found_inf
    assert got["coeffs.gate"].item() == float(gate)
    assert got["coeffs.hd_gate"].item() == float(gate and t_old + 1 >= 2)
    before = {k: v.cpu() for k, v in job.group_state.items()}
    if not gate:  # skipped: the state is bit-identical, the skip counter grew
        assert got["skipped"].item() == before["skipped"].item() + 1
        for key, value in before.items():
            if key != "skipped":
                assert torch.equal(got[key], value), key
        assert not got["coeffs.kappa_units"].any() and got["coeffs.param_parent"].isfinite().all()
    elif t_old + 1 < 2:  # t = 1: the rates and weights keep their initial values
        for key in ("weights", "rate_global", "rate_layer", "rate_unit"):
            if key in before:
                assert torch.equal(got[key], before[key]), key


def test_nonfinite_sums_without_guard_propagate_like_torch(stage):
    """skip_nonfinite=False: a NaN sum proceeds; NaN rates (the clamp keeps NaN) and weights
    that fall back to uniform, exactly as the torch stage does."""
    opts = _options(ALL, skip_nonfinite=False)
    job, sums = _inputs(opts, PLAN_MIXED, seed=5, nan=True, dtype=stage[1])
    want, _ = _assert_matches(stage[0], job, sums)
    assert want["rate_unit"].isnan().any() and want["rate_global"].isnan()


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
@pytest.mark.parametrize("plan", ["all", "one", "wide"])
def test_plans(stage, plan, rule):
    spec = {"all": PLAN_ALL, "one": PLAN_ONE, "wide": PLAN_WIDE}[plan]
    opts = _options(ALL, hypergrad_rule=rule, shrinkage={"unit": 0.3, "param": 0.4},
                    hypergrad_lr=2e-4 if plan == "wide" and rule == "additive" else None)
    job, sums = _inputs(opts, spec, seed=11, dtype=stage[1])
    _assert_matches(stage[0], job, sums)


@pytest.mark.parametrize("t_old", [0.0, 1.0, 5.0])
@needs_triton
def test_triton_many_programs(monkeypatch, t_old):
    """Blocks of 16 units and layers: 40 tensors (one without gradient) and 89 units over
    several programs of each launch; the sums of a layer span several blocks of units. Every
    program must read the old t, lr_scale, weights and rates, whatever the others wrote."""
    monkeypatch.setattr(triton_backend.level_kernels, "MAX_BLOCK", 16)
    monkeypatch.setattr(triton_backend.level_kernels, "SUMS_TILE", 64)  # [4, 16] tiles: 10 programs
    shapes = tuple([(2, 3)] * 30 + [(), (20,)] + [(1, 2, 1, 1)] * 8)
    spec = (shapes, tuple(i for i in range(len(shapes)) if i != 5))
    for rule in ("additive", "multiplicative"):
        opts = _options(("unit", "global", "layer", "param"), hypergrad_rule=rule, hd_decay=0.1, lr_scale=1.5,
                        shrinkage={"unit": 0.3, "layer": 0.2, "param": 0.1})
        job, sums = _inputs(opts, spec, seed=13, t_old=t_old, dtype=torch.float32)
        lt_key = ("triton_levels", job.group_state["weights"].device)
        _assert_matches(triton_backend.level_stage, job, sums)
        tables = job.plan.cached(lt_key, lambda: None)
        assert tables.grid > 1 and tables.sums_layers < tables.num_layers and tables.sums_block < tables.max_units


def _large_case(rule, dtype):
    opts = _options(ALL, hypergrad_rule=rule, shrinkage={"layer": 0.3, "unit": 0.3, "param": 0.4},
                    hypergrad_lr=2e-5 if rule == "additive" else None)
    return _inputs(opts, PLAN_LARGE, seed=19, zero_q=True, dtype=dtype)


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
def test_large_group(stage, rule):
    """Thousands of layers and a hundred thousand units (the Triton interpreter takes 10 s
    a call: test_triton_many_programs covers its programs)."""
    if stage[0] is STAGES["triton"][0]:
        pytest.skip("triton: too slow under the interpreter")
    job, sums = _large_case(rule, stage[1])
    want, _ = _assert_matches(stage[0], job, sums)
    before = job.group_state
    for key in ("rate_layer", "rate_unit", "weights"):  # not vacuous: they moved, and not all to a bound
        assert not torch.allclose(want[key], before[key].cpu(), rtol=1e-4, atol=0), key
        assert want[key].unique().numel() > want[key].numel() // 2, key


@pytest.mark.skipif(DEVICE.type != "cpu" or STAGES["cuda"][2] is not None,
                    reason="the thread and block order is chosen only in the CUDA emulation")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_stage_is_bit_identical_in_every_thread_and_block_order(monkeypatch, dtype):
    """The CUDA stage's launches have no race and no order-dependent sum."""
    job, sums = _large_case("multiplicative", dtype)
    runs = []
    for order, seed in (("ascending", 0), ("descending", 0), ("random", 1)):
        monkeypatch.setenv("MLHD_CUDA_ON_CPU_ORDER", order)
        monkeypatch.setenv("MLHD_CUDA_ON_CPU_SEED", str(seed))
        runs.append(_run(cuda_backend.level_stage, job, sums))
    for run in runs[1:]:
        for key, value in runs[0].items():
            assert torch.equal(value, run[key]), key


def test_two_calls_are_bit_identical(stage):
    opts = _options(ALL, hypergrad_rule="multiplicative", shrinkage={"unit": 0.3, "param": 0.4})
    job, sums = _inputs(opts, PLAN_WIDE, seed=17, zero_q=True, dtype=stage[1])
    first = _run(stage[0], job, sums)
    second = _run(stage[0], job, sums)
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def _sgd_params(count):
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3) if i % 2 else (4,) for i in range(count)]
    return [torch.randn(shape, generator=gen).to(DEVICE).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("backend", ["triton", "cpp", "cuda"])
def test_backend_uses_its_level_stage(monkeypatch, backend):
    """A step of a fast backend runs its own level stage, not the torch stage (and the
    triton backend's takes LEVEL_STAGE_LAUNCHES launches)."""
    if unavailable_reason(backend, DEVICE) is not None:
        pytest.skip(f"{backend}: {unavailable_reason(backend, DEVICE)}")
    module = triton_backend if backend == "triton" else cpp_backend

    def refuse(job, sums):
        raise AssertionError("update_levels called for an unsharded group")

    monkeypatch.setattr(module, "update_levels", refuse)
    params = _sgd_params(3)
    opt = mlhd.MultiLevelSGD(params, lr=0.05, levels=ALL, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    if backend == "triton":
        assert triton_backend.launches_last_step == 3 + triton_backend.LEVEL_STAGE_LAUNCHES


@needs_triton
def test_triton_sharded_group_steps_with_the_torch_backend(monkeypatch):
    """A sharded group's gate comes from an all-reduce after the reduction, which already
    moved the per-parameter step counts by the local flag: the torch backend runs it."""
    calls = []
    monkeypatch.setattr(triton_backend.torch_backend, "step", lambda job: calls.append(job.sharding_group))
    params = _sgd_params(2)
    opt = mlhd.MultiLevelSGD(params, lr=0.05, levels=ALL, backend="triton")
    opt.sharding_group = "fake"
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="sharded"):
        opt.step()
    assert calls == ["fake"] and triton_backend.launches_last_step == 0


# ATen operations one call of the torch stage dispatches, at most, for groups of up to 4,096
# units (3 more above: ordered_sum's blocks; before this budget: 144, 105, 165 and 133): on
# small models the stage's cost is its count of small operations
STAGE_OPS = {
    (("global", "unit"), "multiplicative"): 60,  # the default
    (("global", "unit"), "additive"): 41,
    (("global", "layer", "param"), "multiplicative"): 71,
    (("global", "layer", "unit"), "additive"): 55,
}


@pytest.mark.parametrize("levels,rule", STAGE_OPS, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_torch_stage_operations(levels, rule):
    """Within its budget, and as many for 40 tensors as for 4 (a test of 0.1 s)."""
    from bench.launches import count_dispatched_ops

    opts = _options(levels, hypergrad_rule=rule)
    counts = []
    for tensors in (4, 40):
        job, sums = _inputs(opts, (((8, 3),) * tensors, tuple(range(tensors))), dtype=torch.float32)
        job.plan.prepare(DEVICE, torch.float32)  # as the optimizer does when it makes the plan
        counts.append(sum(count_dispatched_ops(lambda: update_levels(job, sums)).values()))
    assert counts[0] == counts[1] <= STAGE_OPS[levels, rule], counts
