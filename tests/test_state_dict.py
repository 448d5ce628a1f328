"""state_dict() / load_state_dict() (docs/algorithm.md section 4): "a state saved with one backend loads into
another and continues with the same trajectory"; a state dict from a different configuration
raises."""
import copy
import io

import pytest
import torch

from cases import ALL_LEVELS
from conftest import DEVICE, FAST_BACKENDS, shapes_for
from trajectory import (TOL_F64, GradFn, assert_bitwise_equal_snapshots,
                        assert_trajectories_close, make_params, opt_class,
                        run_optimizer)

BACKENDS = ["reference"] + FAST_BACKENDS
SAVE_AT = 5
MORE = 5

CONFIGS = {
    # per-parameter step counts differ from the group's t (param 3 has no grad at steps 1, 2),
    # momentum buffers, moved weights, shrinkage and hd_decay (so t matters) all in the state
    "SGD": ("SGD", dict(lr=0.05, hypergrad_lr=1e-5, momentum=0.9, nesterov=True,
                        levels=ALL_LEVELS, init_weights=(1, 2, 3, 4), shrinkage={"param": 0.2},
                        hd_decay=0.05, final_lr=0.02)),
    "Adam": ("Adam", dict(lr=0.01, hypergrad_lr=3e-6, weight_decay=0.05,
                          levels=("unit", "global", "param"), init_weights=(1, 2, 3),
                          hd_decay=0.05)),
    "AdamW-mult": ("AdamW", dict(lr=0.01, hypergrad_rule="multiplicative", hypergrad_lr=0.05,
                                 combination_lr=2.0, levels=("global", "layer"),
                                 rate_bounds=(0.009, None))),
}
NONE = {(1, 3), (2, 3)}


def _device(backend):
    return "cpu" if backend == "reference" else DEVICE


def _start(cls, kw, backend, dtype, shapes):
    ps = make_params(dtype, _device(backend), 0, shapes)
    return ps, opt_class(cls)(ps, backend=backend, **kw)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend_b", BACKENDS)
@pytest.mark.parametrize("backend_a", BACKENDS)
def test_resume_across_backends(backend_a, backend_b, config):
    cls, kw = CONFIGS[config]
    slow = backend_a if backend_a != "reference" else backend_b
    shapes = shapes_for(slow)
    gf = GradFn(shapes, none=NONE)
    ps, opt = _start(cls, kw, backend_a, torch.float64, shapes)
    run_optimizer(opt, gf, SAVE_AT)
    saved_params = [p.detach().clone() for p in ps]
    sd = copy.deepcopy(opt.state_dict())
    rates_at_save = copy.deepcopy(opt.rates())
    uninterrupted = run_optimizer(opt, gf, MORE, start=SAVE_AT)

    def at_save_point():
        qs = make_params(torch.float64, _device(backend_b), 0, shapes)
        with torch.no_grad():
            for p, q in zip(qs, saved_params):
                p.copy_(q)
        return qs

    # a fresh optimizer with the other backend, on copies of the parameters at the save point
    opt_b = opt_class(cls)(at_save_point(), backend=backend_b, **kw)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["backend"] == backend_b  # loading never changes the backend
    got = opt_b.rates()
    for a, b in zip(_flat(got[0]), _flat(rates_at_save[0])):
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=0, atol=0)
    resumed = run_optimizer(opt_b, gf, MORE, start=SAVE_AT)
    assert_trajectories_close(resumed, uninterrupted, TOL_F64,
                              label=f"{backend_a} -> {backend_b} resumed vs uninterrupted")
    assert opt_b._backends[0].name == backend_b
    # the state really carried something: a fresh optimizer from the same point differs
    fresh = run_optimizer(opt_class(cls)(at_save_point(), backend=backend_b, **kw), gf, MORE,
                          start=SAVE_AT)
    diff = max(float((a - b).abs().max()) for a, b in
               zip(fresh[-1]["params"], uninterrupted[-1]["params"]) if a.numel())
    assert diff > 1e-4


def _flat(rates_group):
    out = [rates_group["weights"]]
    for k in sorted(rates_group):
        v = rates_group[k]
        if k != "weights":
            out += list(v) if isinstance(v, (list, tuple)) else [v]
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_same_backend_float32_bit_identical(backend, config):
    cls, kw = CONFIGS[config]
    shapes = shapes_for(backend)
    gf = GradFn(shapes, none=NONE)
    ps, opt = _start(cls, kw, backend, torch.float32, shapes)
    run_optimizer(opt, gf, SAVE_AT)
    saved_params = [p.detach().clone() for p in ps]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    uninterrupted = run_optimizer(opt, gf, MORE, start=SAVE_AT)

    buf.seek(0)
    sd = torch.load(buf)  # default weights_only=True: the state dict holds plain data only
    ps2 = make_params(torch.float32, _device(backend), 0, shapes)
    with torch.no_grad():
        for p, q in zip(ps2, saved_params):
            p.copy_(q)
    opt2 = opt_class(cls)(ps2, backend=backend, **kw)
    opt2.load_state_dict(sd)
    resumed = run_optimizer(opt2, gf, MORE, start=SAVE_AT)
    assert_bitwise_equal_snapshots(resumed, uninterrupted, label="torch.save/load round trip")


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_saved_under_a_backend_that_cannot_run_here_resumes(backend):
    """A checkpoint names the backend it was saved under (a GPU run's "triton", say); loading
    it keeps this optimizer's own backend, so the run resumes where that one cannot run."""
    cls, kw = CONFIGS["Adam"]
    shapes = shapes_for(backend)
    gf = GradFn(shapes)
    ps, opt = _start(cls, kw, backend, torch.float32, shapes)
    run_optimizer(opt, gf, 2)
    saved_params = [p.detach().clone() for p in ps]
    sd = copy.deepcopy(opt.state_dict())
    uninterrupted = run_optimizer(opt, gf, 2, start=2)
    elsewhere = "cuda" if torch.device(_device(backend)).type == "cpu" else "cpp"
    for group in sd["param_groups"]:
        group["backend"] = elsewhere

    ps2, opt2 = _start(cls, kw, backend, torch.float32, shapes)
    with torch.no_grad():
        for p, q in zip(ps2, saved_params):
            p.copy_(q)
    opt2.load_state_dict(sd)
    assert [g["backend"] for g in opt2.param_groups] == [backend]
    assert_bitwise_equal_snapshots(run_optimizer(opt2, gf, 2, start=2), uninterrupted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_of_fresh_optimizer_loads(backend):
    cls, kw = CONFIGS["SGD"]
    shapes = shapes_for(backend)
    gf = GradFn(shapes)
    ps, opt = _start(cls, kw, backend, torch.float64, shapes)
    sd = copy.deepcopy(opt.state_dict())
    ps2, opt2 = _start(cls, kw, backend, torch.float64, shapes)
    opt2.load_state_dict(sd)
    a = run_optimizer(opt, gf, 4)
    b = run_optimizer(opt2, gf, 4)
    assert_bitwise_equal_snapshots(a, b)


# ------------------------------------------------------------------------------------------
# a state dict from a different configuration raises
# ------------------------------------------------------------------------------------------
MISMATCHES = [
    ("sgd-into-adam", ("SGD", dict(momentum=0.9)), ("Adam", dict()), None),
    ("adam-into-sgd", ("Adam", dict()), ("SGD", dict(momentum=0.9)), None),
    ("adam-into-sgd-nomomentum", ("Adam", dict()), ("SGD", dict()), None),
    ("levels", ("SGD", dict(levels=("global", "unit"))), ("SGD", dict(levels=("global", "layer"))), None),
    ("levels-count", ("Adam", dict(levels=("global", "unit"))),
     ("Adam", dict(levels=("global", "unit", "param"))), None),
    ("fewer-params", ("SGD", dict()), ("SGD", dict()), "drop"),
    ("other-shapes", ("SGD", dict(levels=ALL_LEVELS)), ("SGD", dict(levels=ALL_LEVELS)), "shapes"),
]


@pytest.mark.parametrize("name,src,dst,params_change", MISMATCHES, ids=[m[0] for m in MISMATCHES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_from_other_configuration_raises(backend, name, src, dst, params_change):
    shapes = shapes_for(backend)
    gf = GradFn(shapes)
    ps, opt = _start(src[0], src[1], backend, torch.float32, shapes)
    run_optimizer(opt, gf, 3)
    sd = copy.deepcopy(opt.state_dict())
    ps2 = make_params(torch.float32, _device(backend), 0, shapes)
    if params_change == "drop":
        ps2 = ps2[:-2]
    elif params_change == "shapes":
        # same count, other shapes: swap two tensors' places
        ps2 = [ps2[2], ps2[1], ps2[0]] + ps2[3:]
    opt2 = opt_class(dst[0])(ps2, backend=backend, **dst[1])
    with pytest.raises((ValueError, RuntimeError)):
        opt2.load_state_dict(sd)
