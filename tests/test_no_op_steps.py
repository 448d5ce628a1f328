"""Steps that change nothing (docs/algorithm.md section 2.2 and 4), on every backend.

* A skipped step (a NaN or Inf gradient, or GradScaler's found_inf) leaves every parameter
  and state tensor bit-identical whatever the other gradients hold (finite up to the dtype's
  max, Inf, NaN), and the run continues as if the step had not been taken: a property over
  random configurations (base optimizer, levels, rule, dtype, what skips the step).
* Without the guard (skip_nonfinite=False), a NaN or Inf gradient at t = 1 leaves the rates
  and weights at their initial values (docs/algorithm.md section 2: at t = 1 rates keep their initial values),
  and a later one moves them exactly as the reference backend does.
* A step that raises (an option made bad between steps, levels or momentum changed after the
  first step, a sparse gradient, a backend that cannot run) changes nothing, in any param
  group, and the run then continues as one that never tried it.
"""
import copy

import pytest
import torch
pytest.importorskip("hypothesis")  # a test dependency; without it, skip rather than abort the collection
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cases import ALL_LEVELS
from conftest import ALL_BACKENDS, DEVICE, FAST_BACKENDS, is_slow, shapes_for
from trajectory import (TOL_F64, GradFn, assert_bitwise_equal_snapshots, assert_state_unchanged,
                        assert_trajectories_close, make_params, opt_class, opt_snapshot,
                        run_optimizer)

BACKENDS = ["reference"] + FAST_BACKENDS
# a backend that cannot run on the test device, if any (on a CPU with the GPU backends
# interpreted or emulated, every one can)
UNRUNNABLE = next((b for b in ("cpp", "cuda", "triton") if b not in ALL_BACKENDS), None)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BASES = {
    "sgd": ("SGD", dict(lr=0.05)),
    "sgd-momentum": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1)),
    "sgd-nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": ("Adam", dict(lr=0.01)),
    "adamw": ("AdamW", dict(lr=0.01)),
    "adam-amsgrad": ("Adam", dict(lr=0.01, amsgrad=True)),
}
POISONED = 2  # the gradient that holds the NaN or Inf (a 2-D tensor in every shape set)


# What makes the second of two param groups fail at the next step: options set on it (the
# first group alone would step), or "sparse" (its last gradient). The backend is the one
# that cannot run on the test device.
FAILURES = {
    "levels-other-same-size": (dict(levels=("global", "layer")), ValueError),
    "levels-reordered": (dict(levels=("unit", "global")), ValueError),
    "levels-added": (dict(levels=("global", "unit", "param")), ValueError),
    "momentum-to-zero": (dict(momentum=0.0), ValueError),
    "bounds-string": (dict(rate_bounds=("a", None)), TypeError),
    "bounds-nan": (dict(rate_bounds=(float("nan"), None)), ValueError),
    "beta-inf": (dict(hypergrad_lr=float("inf")), ValueError),
    "beta-inactive-level": (dict(hypergrad_lr={"param": 1e-3}), ValueError),
    "shrinkage-inactive-level": (dict(shrinkage={"layer": 0.1}), ValueError),
    "lr-nan": (dict(lr=float("nan")), ValueError),
    "backend-unknown": (dict(backend="numpy"), ValueError),
    "backend-cannot-run": (dict(backend=UNRUNNABLE), RuntimeError),
    "sparse": (None, RuntimeError),
}
SLOW_FAILURES = ("levels-other-same-size", "bounds-string", "sparse")


def _failure_cases():
    for backend in BACKENDS:
        for name in FAILURES:
            if name == "backend-cannot-run" and UNRUNNABLE is None:
                continue
            if not is_slow(backend) or name in SLOW_FAILURES:
                yield pytest.param(backend, name, id=f"{backend}-{name}")


def _device(backend):
    return "cpu" if backend == "reference" else DEVICE


@st.composite
def _skip_configs(draw):
    cls, kw = BASES[draw(st.sampled_from(sorted(BASES)))]
    levels = tuple(draw(st.permutations(ALL_LEVELS))[: draw(st.integers(1, 4))])
    rule = draw(st.sampled_from(["additive", "multiplicative"]))
    kw = dict(kw, levels=levels, hypergrad_rule=rule, hypergrad_lr=0.05 if rule == "multiplicative" else 1e-3,
              weight_decay=draw(st.sampled_from([0.0, 0.1])), maximize=draw(st.booleans()))
    fine = [lv for lv in levels if lv != "global"]
    if len(levels) > 1 and fine and draw(st.booleans()):
        kw["shrinkage"] = {draw(st.sampled_from(fine)): 0.3}
    # what skips the step: a non-finite gradient, or GradScaler's found_inf (then with or
    # without the guard: the gradients hold an Inf either way, as after an overflow)
    cause = draw(st.sampled_from(["nan", "inf", "-inf", "found_inf"]))
    if cause == "found_inf":
        kw["skip_nonfinite"] = draw(st.booleans())
    huge = draw(st.booleans())  # every other gradient +-the dtype's largest finite value
    return cls, kw, draw(st.sampled_from(DTYPES)), cause, huge


def _poisoned_grads(gf, step, ps, cause, huge):
    grads = gf.grads(step, ps)
    for i, g in enumerate(grads):
        if i == POISONED:
            g.view(-1)[0] = float("nan") if cause == "nan" else -float("inf") if cause == "-inf" else float("inf")
        elif huge and g.numel():
            g.copy_(torch.where(g < 0, -1.0, 1.0) * torch.finfo(g.dtype).max)
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_changes_nothing(backend):
    shapes = shapes_for(backend)

    @settings(max_examples=6 if is_slow(backend) else 40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_skip_configs())
    def check(cfg):
        cls, kw, dtype, cause, huge = cfg
        gf = GradFn(shapes)

        def start():
            ps = make_params(dtype, _device(backend), 0, shapes)
            opt = opt_class(cls)(ps, backend=backend, **kw)
            run_optimizer(opt, gf, 2)  # t = 2: rates, weights and every state have moved
            return ps, opt

        ps, opt = start()
        before = copy.deepcopy((opt.state_dict(), ps))
        for p, g in zip(ps, _poisoned_grads(gf, 2, ps, cause, huge)):
            p.grad = g
        if cause == "found_inf":  # what torch.amp.GradScaler.step hands the optimizer
            opt.grad_scale = torch.ones((), device=ps[0].device)
            opt.found_inf = torch.ones((), device=ps[0].device)
        opt.step()
        opt.__dict__.pop("grad_scale", None)
        opt.__dict__.pop("found_inf", None)
        assert opt.skipped_steps() == [1]
        assert_state_unchanged(before, (opt.state_dict(), ps), counters_grown=1)

        # the run goes on exactly as one that never took the skipped step
        after_skip = run_optimizer(opt, gf, 2, start=3)
        for snap in after_skip:
            snap["skipped"] = [0]
        _, twin = start()
        assert_bitwise_equal_snapshots(after_skip, run_optimizer(twin, gf, 2, start=3), label=f"{backend} {cfg}")

    check()


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
@pytest.mark.parametrize("cls", ["SGD", "Adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradient_without_the_guard(backend, cls, rule):
    """skip_nonfinite=False: the step proceeds (the parameters holding NaN or Inf gradients
    turn non-finite). At t = 1 every rate and weight keeps its initial value; at t = 2 the
    rates and weights move as the reference backend moves them (an Inf hyper-gradient
    gives an Inf additive rate, a finite multiplicative one)."""
    shapes = shapes_for(backend)
    kw = dict(lr=0.05 if cls == "SGD" else 0.01, levels=ALL_LEVELS, hypergrad_rule=rule,
              hypergrad_lr=0.05 if rule == "multiplicative" else 1e-3, skip_nonfinite=False)
    if cls == "SGD":
        kw["momentum"] = 0.9
    poison = {(0, 2): float("nan"), (0, 3): float("inf"), (1, 4): float("inf"), (1, 5): -float("inf")}
    gf = GradFn(shapes, poison=poison)
    ps = make_params(torch.float64, _device(backend), 0, shapes)
    opt = opt_class(cls)(ps, backend=backend, **kw)
    initial = opt_snapshot(opt)["rates"]
    got = run_optimizer(opt, gf, 2)
    assert got[0]["skipped"] == [0] and not torch.isfinite(got[0]["params"][2]).all()
    assert_state_unchanged(initial, got[0]["rates"])  # rates and weights, bit for bit
    ref = opt_class(cls)(make_params(torch.float64, "cpu", 0, shapes), backend="reference", **kw)
    assert_trajectories_close(got, run_optimizer(ref, gf, 2), TOL_F64, label=f"{backend} vs reference")


@pytest.mark.parametrize("backend,failure", list(_failure_cases()))
def test_step_that_raises_changes_nothing(backend, failure):
    shapes = shapes_for(backend)
    gf = GradFn(shapes)
    kw = dict(lr=0.05, momentum=0.9, hypergrad_lr=1e-3, levels=("global", "unit"), backend=backend)

    def start():
        ps = make_params(torch.float32, _device(backend), 0, shapes)
        opt = opt_class("SGD")([dict(params=ps[:3]), dict(params=ps[3:], lr=0.02)], **kw)
        run_optimizer(opt, gf, 2)
        return ps, opt

    ps, opt = start()
    before = copy.deepcopy((opt.state_dict(), ps))
    bad, error = FAILURES[failure]
    group = opt.param_groups[1]
    good = {key: group[key] for key in bad or {}}
    group.update(bad or {})
    for p, g in zip(ps, gf.grads(2, ps)):
        p.grad = g.to_sparse() if failure == "sparse" and p is ps[-1] else g
    with pytest.raises(error):
        opt.step()
    group.update(good)
    assert_state_unchanged(before, (opt.state_dict(), ps))

    continued = run_optimizer(opt, gf, 2, start=2)
    _, twin = start()
    assert_bitwise_equal_snapshots(continued, run_optimizer(twin, gf, 2, start=2), label=f"{backend} after {failure}")
