"""Invariants and API behaviour of docs/algorithm.md sections 2 and 4, for the reference and every fast
backend: rate bounds, the weight simplex, the non-finite guard, parameters without
gradients, param groups, rates()/effective_rate(), closures, zero_grad, add_param_group,
defaults."""
import copy
import math

import pytest
import torch

import multilevel_hd as mlhd
from cases import ALL_LEVELS, OPTION_CASES, C
from conftest import DEVICE, FAST_BACKENDS, is_slow, shapes_for
from trajectory import (TOL_F64, GradFn, Tol, assert_bitwise_equal_snapshots,
                        assert_state_unchanged, assert_trajectories_close, make_params, n_units,
                        opt_class, opt_snapshot, run_case, run_optimizer, same_bits)

BACKENDS = ["reference"] + FAST_BACKENDS
CASES = {c.name: c for c in OPTION_CASES}
TIGHT = Tol(1e-12, 1e-12, 1e-14, 1e-12)


def _params(dtype=torch.float32, backend="reference", seed=0):
    return make_params(dtype, DEVICE, seed, shapes_for(backend))


def _gradfn(backend, **kw):
    return GradFn(shapes_for(backend), **kw)


def _rate_tensors(rates_group):
    out = []
    for k, v in rates_group.items():
        if k != "weights":
            out += list(v) if isinstance(v, (list, tuple)) else [v]
    return [x for x in out if x.numel()]


# ------------------------------------------------------------------------------------------
# rate bounds and the simplex
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["sgd-bounds-lohi", "adam-bounds-lohi", "sgd-bounds-hi-only",
                                  "sgd-bounds-default", "adam-bounds-default"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rates_stay_in_bounds_and_the_clamp_binds(backend, name, dtype):
    case = CASES[name]
    lo, hi = case.kwargs.get("rate_bounds", (0.0, None))
    # full shapes even for slow backends: whether the clamps bind depends on them
    snaps = run_case(case, backend, dtype, device=DEVICE)
    rdtype = torch.float64 if dtype == torch.float64 else torch.float32
    hit_lo = hit_hi = False
    for s in snaps:
        for r in _rate_tensors(s["rates"][0]):
            if lo is not None:
                assert float(r.min()) >= float(torch.tensor(lo, dtype=rdtype)), (name, float(r.min()))
                hit_lo |= bool((r == float(torch.tensor(lo, dtype=rdtype))).any())
            if hi is not None:
                assert float(r.max()) <= float(torch.tensor(hi, dtype=rdtype)), (name, float(r.max()))
                hit_hi |= bool((r == float(torch.tensor(hi, dtype=rdtype))).any())
    if hi is not None:
        assert hit_hi, f"{name}: the upper bound never binds; test too weak"
    if name != "adam-bounds-lohi" and lo is not None:
        assert hit_lo, f"{name}: the lower bound never binds; test too weak"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rates_unbounded_with_rate_bounds_none(backend, dtype):
    snaps = run_case(CASES["sgd-bounds-none"], backend, dtype, device=DEVICE)
    assert min(float(r.min()) for s in snaps for r in _rate_tensors(s["rates"][0])) < 0


SIMPLEX_CASES = [
    ("additive", dict(lr=0.05, hypergrad_rule="additive", hypergrad_lr=1e-4, combination_lr=10.0), True),
    ("additive-adam", dict(lr=0.01, hypergrad_rule="additive", hypergrad_lr=1e-4, combination_lr=30.0), False),
    ("multiplicative", dict(lr=0.05, hypergrad_lr=0.1, hypergrad_rule="multiplicative",
                            combination_lr=10.0), False),
]


@pytest.mark.parametrize("name,kw,binds", SIMPLEX_CASES, ids=[c[0] for c in SIMPLEX_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_stay_on_the_simplex(backend, name, kw, binds):
    cls = "Adam" if "adam" in name else "SGD"
    ps = make_params(torch.float32, DEVICE)  # full shapes: the binding case depends on them
    opt = opt_class(cls)(ps, levels=ALL_LEVELS, init_weights=(1, 2, 3, 4), backend=backend, **kw)
    snaps = run_optimizer(opt, GradFn(noise=3.0), 12)
    zero = False
    moved = 0.0
    for s in snaps:
        w = s["rates"][0]["weights"]
        assert w.shape == (4,)
        assert float(w.min()) >= 0.0
        assert abs(float(w.sum()) - 1.0) < 1e-6
        zero |= bool((w == 0).any())
        moved = max(moved, float((w - torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=w.dtype)).abs().max()))
    assert moved > 1e-3
    if binds:
        assert zero, "the w >= 0 clamp never binds; test too weak"


# ------------------------------------------------------------------------------------------
# the non-finite guard
# ------------------------------------------------------------------------------------------
GUARD_CONFIGS = {
    "sgd-nesterov-hd-decay": ("SGD", dict(lr=0.05, hypergrad_lr=1e-5, momentum=0.9, nesterov=True,
                                          hd_decay=0.05, final_lr=0.01, levels=ALL_LEVELS)),
    "adam-wd": ("Adam", dict(lr=0.01, hypergrad_lr=3e-6, weight_decay=0.1, hd_decay=0.05,
                             levels=("global", "unit", "param"), init_weights=(1, 2, 3))),
    "adamw-mult": ("AdamW", dict(lr=0.01, hypergrad_rule="multiplicative", hypergrad_lr=0.05,
                                 combination_lr=2.0)),
}
POISONS = [("nan", 3, float("nan")), ("inf", 0, float("inf")), ("-inf", 5, -float("inf"))]


# every poison in every configuration; a slow backend (triton's interpreter) one poison per
# configuration, each a different one
GUARD_RUNS = [(b, c, p) for b in BACKENDS for i, c in enumerate(GUARD_CONFIGS) for j, p in enumerate(POISONS)
              if not is_slow(b) or i == j]


@pytest.mark.parametrize("backend,config,poison", GUARD_RUNS, ids=[f"{b}-{c}-{p[0]}" for b, c, p in GUARD_RUNS])
def test_nonfinite_gradient_skips_the_group_step(backend, config, poison):
    cls, kw = GUARD_CONFIGS[config]
    _, index, value = poison
    bad_step = 4
    ps = _params(torch.float32, backend)
    gf = _gradfn(backend, poison={(bad_step, index): value})
    opt = opt_class(cls)(ps, backend=backend, **kw)
    run_optimizer(opt, gf, bad_step)
    before_sd = copy.deepcopy(opt.state_dict())
    before = opt_snapshot(opt)
    for i, p in enumerate(ps):
        p.grad = gf.grad(bad_step, i, p)
    assert not torch.isfinite(ps[index].grad).all()
    opt.step()
    after = opt_snapshot(opt)
    assert opt.skipped_steps() == [1]
    assert before["skipped"] == [0]
    after["skipped"] = before["skipped"]
    # parameters, rates, weights, effective rates: bit-identical
    assert_bitwise_equal_snapshots([after], [before], label="after a skipped step")
    # every state tensor too (and t: the state dict may differ only in the skip counter)
    assert_state_unchanged(before_sd, copy.deepcopy(opt.state_dict()), counters_grown=1)

    # the next finite steps proceed as if the bad step never happened
    cont = run_optimizer(opt, gf, 4, start=bad_step + 1)
    ps2 = _params(torch.float32, backend)
    opt2 = opt_class(cls)(ps2, backend=backend, **kw)
    run_optimizer(opt2, gf, bad_step)
    clean = run_optimizer(opt2, gf, 4, start=bad_step + 1)
    for s in cont:
        assert s["skipped"] == [1]
        s["skipped"] = [0]
    assert_bitwise_equal_snapshots(cont, clean, label="continuation after a skipped step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_guard_is_per_group(backend):
    ps = _params(torch.float32, backend)
    gf = _gradfn(backend, poison={(3, 1): float("nan")})
    groups = [dict(params=ps[:3]), dict(params=ps[3:], lr=0.02)]
    opt = mlhd.MultiLevelSGD(groups, lr=0.05, hypergrad_lr=1e-5, backend=backend)
    run_optimizer(opt, gf, 3)
    before = [p.detach().clone() for p in ps]
    for i, p in enumerate(ps):
        p.grad = gf.grad(3, i, p)
    opt.step()
    assert opt.skipped_steps() == [1, 0]
    for i, (p, q) in enumerate(zip(ps, before)):
        if i < 3:
            assert torch.equal(p.detach(), q), i
        elif p.numel():
            assert not torch.equal(p.detach(), q), i


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nonfinite_false_does_not_skip(backend):
    ps = _params(torch.float32, backend)
    gf = _gradfn(backend, poison={(3, 2): float("nan")})
    opt = mlhd.MultiLevelSGD(ps, lr=0.05, hypergrad_lr=1e-5, skip_nonfinite=False, backend=backend)
    run_optimizer(opt, gf, 3)
    before = [p.detach().clone() for p in ps]
    for i, p in enumerate(ps):
        p.grad = gf.grad(3, i, p)
    opt.step()
    assert opt.skipped_steps() == [0]
    assert torch.isnan(ps[2].detach().reshape(-1)[0])
    for i, (p, q) in enumerate(zip(ps, before)):
        if p.numel():
            assert not torch.equal(p.detach(), q), f"param {i} did not step"


# ------------------------------------------------------------------------------------------
# parameters without a gradient; param groups
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["SGD", "Adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_param_without_grad_is_untouched(backend, cls):
    ps = _params(torch.float32, backend)
    none_steps = (3, 4, 5)
    idx = 3
    gf = _gradfn(backend, none={(s, idx) for s in none_steps})
    kw = dict(levels=ALL_LEVELS, init_weights=(1, 2, 3, 4), momentum=0.9) if cls == "SGD" else \
        dict(levels=ALL_LEVELS, init_weights=(1, 2, 3, 4))
    kw.update(C("x", cls).kwargs)
    opt = opt_class(cls)(ps, backend=backend, **kw)
    run_optimizer(opt, gf, none_steps[0])
    p = ps[idx]
    p0 = p.detach().clone()
    st0 = copy.deepcopy(opt.state[p])
    r0 = opt.rates()[0]
    others0 = [q.detach().clone() for q in ps]
    for s in none_steps:
        for i, q in enumerate(ps):
            q.grad = gf.grad(s, i, q)
        assert p.grad is None
        opt.step()
        assert torch.equal(p.detach(), p0)
        st = opt.state[p]
        assert set(st) == set(st0)
        for k in st0:
            assert same_bits(st[k], st0[k]), f"state[{k!r}] of a parameter without grad changed"
        r = opt.rates()[0]
        for lv in ("layer", "unit", "param"):
            assert torch.equal(r[lv][idx], r0[lv][idx]), f"{lv} rate of a parameter without grad changed"
    assert not torch.equal(r["global"], r0["global"])
    for i, (q, q0) in enumerate(zip(ps, others0)):
        if i != idx and q.numel():
            assert not torch.equal(q.detach(), q0)
    # and it resumes
    for i, q in enumerate(ps):
        q.grad = gf.grad(10, i, q)
    opt.step()
    assert not torch.equal(p.detach(), p0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_moments_in_different_layouts(backend):
    """A parameter whose m and v are laid out differently (v made contiguous, m left
    channels_last or transposed, as a hand-edited or converted state may be) steps as the
    reference does: the torch backend's fused Adam kernel walks m, v, g in one storage
    order, so such a group must take its per-tensor path. float64, 6 steps."""
    kw = dict(levels=("global", "unit"), hypergrad_rule="multiplicative", hypergrad_lr=0.1)
    gf = _gradfn(backend)
    runs = []
    for name in (backend, "reference"):
        ps = make_params(torch.float64, DEVICE if name == backend else "cpu", 0, shapes_for(backend))
        opt = mlhd.MultiLevelAdam(ps, lr=0.01, backend=name, **kw)
        snaps = run_optimizer(opt, gf, 3)
        for st in opt.state.values():
            st["exp_avg_sq"] = st["exp_avg_sq"].contiguous()
        runs.append(snaps + run_optimizer(opt, gf, 3, start=3))
    assert_trajectories_close(*runs, TOL_F64, label=f"{backend} vs reference, v made contiguous after step 3")


def _two_group_setup(cls):
    base = C("x", cls).kwargs
    g0 = dict(base, levels=("layer", "param"), init_weights=(1, 2))
    g1 = dict(base, levels=("global", "unit", "param"), lr=base["lr"] * 0.7,
              hypergrad_rule="multiplicative", hypergrad_lr=0.05, combination_lr=2.0,
              init_weights=(3, 2, 1), shrinkage={"param": 0.2}, hd_decay=0.05)
    if cls == "SGD":
        g1.update(momentum=0.9, nesterov=True)
    else:
        g1.update(weight_decay=0.1, decoupled_weight_decay=True)
    return g0, g1


@pytest.mark.parametrize("cls", ["SGD", "Adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_groups_equal_two_separate_runs(backend, cls):
    g0, g1 = _two_group_setup(cls)
    none = {(2, 1), (3, 1), (5, 4)}
    ps = _params(torch.float64, backend)
    gf = _gradfn(backend, none=none)
    opt = opt_class(cls)([dict(params=ps[:3], **g0), dict(params=ps[3:], **g1)], backend=backend)
    both = run_optimizer(opt, gf, 10)

    ps2 = _params(torch.float64, backend)
    o0 = opt_class(cls)(ps2[:3], backend=backend, **g0)
    o1 = opt_class(cls)(ps2[3:], backend=backend, **g1)
    _assert_groups_match_separate_runs(both, o0, o1, ps2, gf,
                                       eff_skip_at=lambda s: {i for (st, i) in none if st == s})


@pytest.mark.parametrize("cls", ["SGD", "Adam"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_grad_none_two_groups_match_reference(backend, cls):
    g0, g1 = _two_group_setup(cls)
    none = {(2, 2), (3, 2), (4, 2), (5, 3), (6, 0), (6, 1), (6, 4), (7, 5)}
    runs = []
    for b in (backend, "reference"):
        ps = make_params(torch.float64, DEVICE if b == backend else "cpu", 0, shapes_for(backend))
        opt = opt_class(cls)([dict(params=ps[:3], **g0), dict(params=ps[3:], **g1)], backend=b)
        runs.append(run_optimizer(opt, _gradfn(backend, none=none), 10))
    assert_trajectories_close(runs[0], runs[1], TOL_F64, label=f"{backend} vs reference",
                              eff_skip_at=lambda s: {i for (st, i) in none if st == s})


@pytest.mark.parametrize("backend", BACKENDS)
def test_effective_rate_of_param_without_grad(backend):
    """docs/algorithm.md section 4: effective_rate(p) holds kappa "as applied by the last step".  A parameter that
    had no gradient at the last step was not stepped, so the kappa last applied to it is the
    one of its own last step (the combination weights have moved since)."""
    ps = _params(torch.float64, backend)
    gf = _gradfn(backend, none={(4, 2), (5, 2)})
    opt = mlhd.MultiLevelSGD(ps, lr=0.05, hypergrad_lr=1e-5, levels=("layer", "param"),
                             init_weights=(1, 2), backend=backend)
    run_optimizer(opt, gf, 4)
    e = opt.effective_rate(ps[2]).clone()
    w = opt.rates()[0]["weights"].clone()
    run_optimizer(opt, gf, 2, start=4)
    assert not torch.equal(opt.rates()[0]["weights"], w)  # the combination moved meanwhile
    assert torch.equal(opt.effective_rate(ps[2]), e)


# ------------------------------------------------------------------------------------------
# rates() and effective_rate()
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rates_structure_shapes_dtypes(backend, dtype):
    ps = _params(dtype, backend)
    levels = ("unit", "global", "param", "layer")
    opt = mlhd.MultiLevelAdam(ps, lr=0.01, levels=levels, init_weights=(1, 1, 2, 4),
                              backend=backend)
    rdtype = torch.float64 if dtype == torch.float64 else torch.float32

    def check(r, fresh):
        assert isinstance(r, list) and len(r) == 1
        r = r[0]
        assert set(r) == {"weights", *levels}
        assert r["weights"].shape == (4,) and r["weights"].dtype == rdtype
        if fresh:
            torch.testing.assert_close(r["weights"].double().cpu(),
                                       torch.tensor([0.125, 0.125, 0.25, 0.5], dtype=torch.float64))
        g = r["global"]
        assert isinstance(g, torch.Tensor) and g.shape == () and g.dtype == rdtype
        for lv in ("layer", "unit", "param"):
            assert isinstance(r[lv], (list, tuple)) and len(r[lv]) == len(ps), lv
        for i, p in enumerate(ps):
            assert r["layer"][i].shape == () and r["layer"][i].dtype == rdtype
            assert r["unit"][i].shape == (n_units(p.shape),) and r["unit"][i].dtype == rdtype
            assert r["param"][i].shape == p.shape and r["param"][i].dtype == rdtype
        if fresh:  # all rates start at the group's lr
            for x in _rate_tensors(r):
                assert torch.equal(x, torch.full_like(x, 0.01)), x

    check(opt.rates(), fresh=True)
    gf = _gradfn(backend)
    run_optimizer(opt, gf, 3)
    check(opt.rates(), fresh=False)
    for p in ps:
        if p.numel():
            e = opt.effective_rate(p)
            assert isinstance(e, torch.Tensor) and e.shape == p.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_rates_returns_copies(backend):
    def make():
        ps = _params(torch.float32, backend)
        return ps, mlhd.MultiLevelSGD(ps, lr=0.05, hypergrad_lr=1e-5, levels=ALL_LEVELS,
                                      init_weights=(1, 2, 3, 4), backend=backend)

    gf = _gradfn(backend)
    ps, opt = make()
    run_optimizer(opt, gf, 3)
    r = opt.rates()
    keep = copy.deepcopy(r)
    with torch.no_grad():
        for g in r:
            g["weights"].zero_()
            for x in _rate_tensors(g):
                x.add_(1.0)
        for p in ps:
            if p.numel():
                opt.effective_rate(p).add_(1.0)
    r2 = opt.rates()
    for a, b in zip(_rate_tensors(r2[0]), _rate_tensors(keep[0])):
        assert torch.equal(a, b)
    assert torch.equal(r2[0]["weights"], keep[0]["weights"])
    mutated = run_optimizer(opt, gf, 3, start=3)
    ps2, opt2 = make()
    run_optimizer(opt2, gf, 3)
    clean = run_optimizer(opt2, gf, 3, start=3)
    assert_bitwise_equal_snapshots(mutated, clean, label="after mutating rates()")


@pytest.mark.parametrize("backend", BACKENDS)
def test_effective_rate_with_decay_and_zero_hypergrad_lr(backend):
    """hypergrad_lr=0: rates stay lr, so kappa_t = exp(-d t) lr + (1 - exp(-d t)) final_lr."""
    ps = _params(torch.float64, backend)
    lr, final, d = 0.05, 0.01, 0.3
    opt = mlhd.MultiLevelSGD(ps, lr=lr, hypergrad_lr=0.0, hd_decay=d, final_lr=final,
                             levels=ALL_LEVELS, backend=backend)
    gf = _gradfn(backend)
    for s in range(6):
        before = [p.detach().clone() for p in ps]
        grads = gf.grads(s, ps)
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        t = s + 1
        kappa = math.exp(-d * t) * lr + (1 - math.exp(-d * t)) * final
        for p, q, g in zip(ps, before, grads):
            if p.numel():
                torch.testing.assert_close(opt.effective_rate(p).double().cpu(),
                                           torch.full(p.shape, kappa, dtype=torch.float64),
                                           rtol=1e-12, atol=0)
                torch.testing.assert_close(p.detach().cpu(), (q - kappa * g).cpu(),
                                           rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# step(closure), zero_grad, add_param_group, in-place updates
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["SGD", "Adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_closure_returns_loss(backend, cls):
    ps = _params(torch.float32, backend)
    opt = opt_class(cls)(ps, backend=backend, **C("x", cls).kwargs)
    calls = []

    def closure():
        opt.zero_grad()
        loss = sum((p * p).sum() for p in ps)
        loss.backward()
        calls.append(loss.detach().clone())
        return loss

    before = [p.detach().clone() for p in ps]
    with torch.no_grad():  # torch.optim evaluates the closure with grad enabled
        out = opt.step(closure)
    assert len(calls) == 1
    assert isinstance(out, torch.Tensor) and torch.equal(out.detach(), calls[0])
    for p, q in zip(ps, before):
        if p.numel():
            assert not torch.equal(p.detach(), q)
    for p in ps:
        p.grad = torch.ones_like(p)
    assert opt.step() is None


@pytest.mark.parametrize("cls", ["SGD", "Adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_set_to_none_then_steps(backend, cls):
    def make():
        ps = _params(torch.float64, backend)
        return ps, opt_class(cls)(ps, backend=backend, levels=ALL_LEVELS, **C("x", cls).kwargs)

    gf = _gradfn(backend)
    ps, opt = make()
    run_optimizer(opt, gf, 3)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in ps)
    before = [p.detach().clone() for p in ps]
    r_before = opt.rates()
    opt.step()  # nothing to do: no error, nothing changes
    assert all(torch.equal(p.detach(), q) for p, q in zip(ps, before))
    assert all(torch.equal(a, b) for a, b in zip(_rate_tensors(opt.rates()[0]),
                                                 _rate_tensors(r_before[0])))
    assert opt.skipped_steps() == [0]
    after = run_optimizer(opt, gf, 4, start=3)
    ps2, opt2 = make()
    run_optimizer(opt2, gf, 3)
    clean = run_optimizer(opt2, gf, 4, start=3)
    assert_trajectories_close(after, clean, TIGHT, label="after an empty step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group(backend):
    ps = _params(torch.float64, backend)
    kw = dict(lr=0.05, hypergrad_lr=1e-5, levels=("global", "layer", "param"),
              init_weights=(1, 2, 3), momentum=0.9)
    gf = _gradfn(backend)
    opt = mlhd.MultiLevelSGD(ps[:3], backend=backend, **kw)
    run_optimizer(opt, gf, 3)
    # the new group sets only lr and nesterov; everything else comes from the defaults
    opt.add_param_group(dict(params=ps[3:], lr=0.03, nesterov=True))
    assert len(opt.param_groups) == 2
    r = opt.rates()
    assert len(r) == 2 and set(r[1]) == {"weights", "global", "layer", "param"}
    assert torch.equal(r[1]["global"].double().cpu(), torch.tensor(0.03, dtype=torch.float64))
    torch.testing.assert_close(r[1]["weights"].double().cpu(),
                               torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))
    assert opt.skipped_steps() == [0, 0]
    snaps = run_optimizer(opt, gf, 5, start=3)

    # group 1 equals a fresh optimizer on those tensors started at step 3
    ps2 = _params(torch.float64, backend)
    ref = mlhd.MultiLevelSGD(ps2[3:], backend=backend, **dict(kw, lr=0.03, nesterov=True))
    n0 = 3
    for s in range(3, 8):
        for i, p in enumerate(ps2[3:]):
            p.grad = gf.grad(s, n0 + i, p)
        ref.step()
        exp = opt_snapshot(ref)
        got = snaps[s - 3]
        sub = dict(params=got["params"][n0:], rates=got["rates"][1:], eff=got["eff"][n0:],
                   skipped=got["skipped"][1:])
        assert_trajectories_close([sub], [exp], TIGHT, label=f"added group, step {s}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_params_updated_in_place(backend, dtype):
    """A model holds references to its parameters: they are updated in place (storage and
    strides -- including channels_last -- unchanged)."""
    ps = _params(dtype, backend)
    ptrs = [(p.data_ptr(), p.stride()) for p in ps]
    before = [p.detach().clone() for p in ps]
    opt = mlhd.MultiLevelAdamW(ps, lr=0.01, levels=ALL_LEVELS, backend=backend)
    run_optimizer(opt, _gradfn(backend), 3)
    assert [(p.data_ptr(), p.stride()) for p in ps] == ptrs
    assert ps[5].is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == dtype for p in ps)
    for p, q in zip(ps, before):
        if p.numel():
            assert not torch.equal(p.detach(), q)


# ------------------------------------------------------------------------------------------
# defaults (docs/algorithm.md section 4)
# ------------------------------------------------------------------------------------------
def _traj(cls, backend, steps=8, dtype=torch.float64, **kw):
    ps = _params(dtype, backend)
    opt = opt_class(cls)(ps, backend=backend, **kw)
    return run_optimizer(opt, _gradfn(backend), steps), opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_defaults(backend):
    # lr and init_weights defaults
    _, o = _traj("SGD", backend, steps=0)
    assert o.param_groups[0]["lr"] == 1e-3  # torch.optim.SGD's
    r = o.rates()[0]
    assert set(r) == {"weights", "global", "unit"}
    torch.testing.assert_close(r["weights"].double().cpu(), torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert float(r["global"]) == pytest.approx(1e-3, rel=1e-7)
    _, o = _traj("Adam", backend, steps=0)
    assert o.param_groups[0]["lr"] == 1e-3
    _, o = _traj("Adam", backend, steps=0, levels=("param", "layer", "global"))
    torch.testing.assert_close(o.rates()[0]["weights"].double().cpu(),
                               torch.full((3,), 1 / 3, dtype=torch.float64))
    _, o = _traj("Adam", backend, steps=0, levels=("param", "layer"), init_weights=(1.0, 3.0))
    torch.testing.assert_close(o.rates()[0]["weights"].double().cpu(),
                               torch.tensor([0.25, 0.75], dtype=torch.float64))

    def same(a, b, label):
        assert_trajectories_close(a[0], b[0], TIGHT, label=label)

    # the rule, hypergrad_lr and combination_lr defaults (options.py; README, "The defaults"):
    # multiplicative, beta 0.05, delta min(beta)
    mult = dict(hypergrad_rule="multiplicative", hypergrad_lr=0.05, combination_lr=0.05)
    same(_traj("SGD", backend, lr=0.05), _traj("SGD", backend, lr=0.05, **mult), "SGD defaults")
    same(_traj("Adam", backend, lr=0.01), _traj("Adam", backend, lr=0.01, **mult), "Adam defaults")
    same(_traj("SGD", backend, lr=0.05, hypergrad_lr={"global": 0.05, "unit": 0.03}),
         _traj("SGD", backend, lr=0.05, hypergrad_lr={"global": 0.05, "unit": 0.03}, combination_lr=0.03),
         "multiplicative combination_lr with a beta per level")
    # additive: beta 1e-6 SGD, 1e-8 Adam; delta min(beta)/lr^2
    add = dict(hypergrad_rule="additive")
    same(_traj("SGD", backend, lr=0.05, **add), _traj("SGD", backend, lr=0.05, hypergrad_lr=1e-6,
                                                        combination_lr=1e-6 / 0.05 ** 2, **add), "SGD additive")
    same(_traj("Adam", backend, lr=0.01, **add), _traj("Adam", backend, lr=0.01, hypergrad_lr=1e-8,
                                                         combination_lr=1e-8 / 0.01 ** 2, **add), "Adam additive")
    same(_traj("SGD", backend, lr=0.05, hypergrad_lr={"global": 3e-6, "unit": 1e-6}, **add),
         _traj("SGD", backend, lr=0.05, hypergrad_lr={"global": 3e-6, "unit": 1e-6},
               combination_lr=1e-6 / 0.05 ** 2, **add), "combination_lr = min(beta)/lr^2")
    # final_lr defaults to lr
    same(_traj("SGD", backend, lr=0.05, hd_decay=0.2, hypergrad_lr=1e-5),
         _traj("SGD", backend, lr=0.05, hd_decay=0.2, hypergrad_lr=1e-5, final_lr=0.05), "final_lr")
    # AdamW == Adam(decoupled, weight_decay=1e-2)
    same(_traj("AdamW", backend, lr=0.01, hypergrad_lr=3e-6),
         _traj("Adam", backend, lr=0.01, hypergrad_lr=3e-6, weight_decay=1e-2,
               decoupled_weight_decay=True), "AdamW defaults")
    # the default hypergrad_lr is not a no-op (else the comparisons above prove little)
    a = _traj("SGD", backend, lr=0.05)[0][-1]["rates"][0]["global"]
    assert float(a) > 0.05 * 1.001


def test_auto_backend_runs():
    ps = make_params(torch.float32, DEVICE)
    opt = mlhd.MultiLevelAdam(ps, lr=0.01)  # backend="auto"
    run_optimizer(opt, GradFn(), 3)
    opt2 = mlhd.MultiLevelSGD(make_params(torch.float32, DEVICE), backend="auto")
    run_optimizer(opt2, GradFn(), 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rates_dtype_per_group(backend):
    """Groups of float64, float32 and bfloat16 parameters in one optimizer: each group's
    rates are float64, float32, float32 (docs/algorithm.md section 4)."""
    p64 = _params(torch.float64, backend)[:3]
    p32 = _params(torch.float32, backend, seed=1)[:3]
    p16 = _params(torch.bfloat16, backend, seed=2)[:3]
    opt = mlhd.MultiLevelSGD([dict(params=p64), dict(params=p32), dict(params=p16)], lr=0.05,
                             hypergrad_lr=1e-5, levels=ALL_LEVELS, backend=backend)
    gf = GradFn(tuple(shapes_for(backend)[:3]) * 3)
    run_optimizer(opt, gf, 3)
    for r, dt in zip(opt.rates(), (torch.float64, torch.float32, torch.float32)):
        assert r["weights"].dtype == dt
        for x in _rate_tensors(r):
            assert x.dtype == dt
    assert [p.dtype for p in p64 + p32 + p16] == [torch.float64] * 3 + [torch.float32] * 3 + \
        [torch.bfloat16] * 3


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host synchronisation is observable on CUDA only")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_step_needs_no_host_sync(backend):
    """docs/algorithm.md section 2.2: deciding the non-finite guard needs no host synchronisation."""
    ps = _params(torch.float32, backend)
    gf = _gradfn(backend, poison={(4, 2): float("nan")})
    opt = mlhd.MultiLevelAdam(ps, lr=0.01, levels=ALL_LEVELS, backend=backend)
    run_optimizer(opt, gf, 3)  # warm-up: any one-off setup may synchronise
    grads = [[gf.grad(s, i, p) for i, p in enumerate(ps)] for s in range(3, 6)]
    torch.cuda.synchronize()
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_looks_at_the_gradient_only(backend):
    """docs/algorithm.md section 2.2 skips a step iff an element of g is NaN or Inf.  Finite float32 gradients of
    1e20 (whose products g * u_prev overflow float32) are finite: no step is skipped and the
    parameters move."""
    p = torch.ones(4, device=DEVICE, requires_grad=True)
    q = torch.ones(3, device=DEVICE, requires_grad=True)
    opt = mlhd.MultiLevelSGD([p, q], lr=1e-25, hypergrad_lr=0.0, backend=backend)
    for _ in range(3):
        p.grad = torch.full_like(p, 1e20)
        q.grad = torch.full_like(q, 1.0)
        opt.step()
        assert opt.skipped_steps() == [0]
        assert not torch.equal(p.detach(), torch.ones_like(p))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_set_per_group(backend):
    """docs/algorithm.md section 4: every option may be set per group -- backend included."""
    g0, g1 = _two_group_setup("SGD")
    gf = _gradfn(backend)
    ps = _params(torch.float64, backend)
    opt = mlhd.MultiLevelSGD([dict(params=ps[:3], backend="reference", **g0),
                              dict(params=ps[3:], backend=backend, **g1)])
    both = run_optimizer(opt, gf, 6)
    ps2 = _params(torch.float64, backend)
    o0 = mlhd.MultiLevelSGD(ps2[:3], backend="reference", **g0)
    o1 = mlhd.MultiLevelSGD(ps2[3:], backend=backend, **g1)
    _assert_groups_match_separate_runs(both, o0, o1, ps2, gf)


def _assert_groups_match_separate_runs(both, o0, o1, ps2, gf, eff_skip_at=None):
    """A two-group run (`both`, one snapshot per step) equals two one-group optimizers
    (o0 on ps2[:3], o1 on the rest) stepped on the same gradients."""
    for s in range(len(both)):
        for i, p in enumerate(ps2):
            p.grad = gf.grad(s, i, p)
        o0.step()
        o1.step()
        a, b = opt_snapshot(o0), opt_snapshot(o1)
        sep = dict(params=a["params"] + b["params"], rates=a["rates"] + b["rates"],
                   eff=a["eff"] + b["eff"], skipped=a["skipped"] + b["skipped"])
        kwargs = {} if eff_skip_at is None else {"eff_skip_at": lambda _: eff_skip_at(s)}
        assert_trajectories_close([both[s]], [sep], TIGHT, label=f"step {s}", **kwargs)
