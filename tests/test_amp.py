"""torch.amp.GradScaler: the fused passes unscale the gradients as they read them.

With amp_unscale_in_step=True the optimizer declares `_step_supports_amp_scaling`, so
GradScaler.step() does not unscale the gradients itself: it hands step() its scale (`grad_scale`, None after a user's
`scaler.unscale_`) and `found_inf`. Every backend must then compute exactly the step of
the unscaled gradients (the scale is a power of two, so unscaling is exact), in both
passes and before the coupled weight decay, and skip a step with found_inf > 0 without
touching anything.

* exactness: a GradScaler loop is bit-identical to the plain loop (params, every state
  tensor, group state, rates), Adam and SGD-momentum, all levels, maximize, coupled decay;
* a forced overflow skips exactly that step (with and without the non-finite guard) and
  halves the scale; the run is then bit-identical to a plain loop that left out the step;
* `scaler.unscale_` then gradient clipping (grad_scale None): equal to the plain loop;
* float16 / bfloat16 parameters under a GradScaler: every fast backend matches the reference;
* the default (torch.optim's convention: declared only with fused=True): GradScaler unscales
  in its own pass, step() is handed nothing, and the run is the plain loop's bit for bit.
"""
import copy
import math

import pytest
import torch

import multilevel_hd as mlhd
from conftest import ALL_BACKENDS, DEVICE, FAST_BACKENDS, shapes_for
from trajectory import GradFn, Tol, assert_trajectories_close, make_params, opt_snapshot

BACKENDS = FAST_BACKENDS + (["reference"] if "reference" in ALL_BACKENDS else [])
SCALE = 2.0**12
IN_STEP = dict(amp_unscale_in_step=True)  # the fused unscaling these tests are about
STEPS = 5
LEVELS = ("global", "layer", "unit", "param")

# (name, class, options, loss sign). hypergrad_lr is large enough that every level's rates
# move by well over 1 % in STEPS steps (test_rates_move checks it), so the comparisons
# below are not vacuous.
CASES = [
    ("adam-all-levels", "Adam", dict(lr=0.01, hypergrad_rule="additive", hypergrad_lr=1e-4, levels=LEVELS), 1.0),
    ("adam-coupled-decay", "Adam",
     dict(lr=0.01, hypergrad_rule="additive", hypergrad_lr=1e-4, levels=("global", "unit", "param"), weight_decay=0.1), 1.0),
    ("sgd-momentum-maximize", "SGD",
     dict(lr=0.05, momentum=0.9, hypergrad_rule="additive", hypergrad_lr=1e-3, levels=("layer", "param"), maximize=True), -1.0),
    ("sgd-nesterov-coupled-decay", "SGD",
     dict(lr=0.05, momentum=0.9, nesterov=True, hypergrad_rule="additive", hypergrad_lr=1e-3,
          levels=("global", "unit"), weight_decay=0.05), 1.0),
]
CLASSES = {"Adam": mlhd.MultiLevelAdam, "SGD": mlhd.MultiLevelSGD}


def _case(name):
    return next(c for c in CASES if c[0] == name)


def _net():
    """A tiny float32 MLP (its initial weights fixed) and its data."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        x, y = torch.randn(8, 6), torch.randn(8, 3)
    return net.to(DEVICE), x.to(DEVICE), y.to(DEVICE)


def _setup(case, backend, **extra):
    _, cls, kw, sign = case
    net, x, y = _net()
    opt = CLASSES[cls](net.parameters(), backend=backend, **{**IN_STEP, **kw, **extra})

    def loss():
        return sign * torch.nn.functional.mse_loss(net(x), y)

    return net, opt, loss


def _spy(opt):
    """Records the grad_scale attribute GradScaler set for each step() call."""
    seen, step = [], opt.step

    def spy(closure=None):
        scale = getattr(opt, "grad_scale", "unset")
        seen.append(scale if scale is None or isinstance(scale, str) else float(scale))
        return step(closure)

    opt.step = spy
    return seen


def _scaler():
    return torch.amp.GradScaler(DEVICE.type, init_scale=SCALE)


def _full_state(opt):
    """Copies of everything a step may change: params, per-param state, group state, rates."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {f"param[{i}]": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            out[f"state[{i}].{key}"] = value.clone()
    for gi, gs in enumerate(opt.group_states):
        for key, value in (gs or {}).items():
            out[f"group[{gi}].{key}"] = value.clone()
    for gi, rates in enumerate(opt.rates()):
        for key, value in rates.items():
            for j, v in enumerate(value if isinstance(value, list) else [value]):
                out[f"rates[{gi}].{key}[{j}]"] = v.clone()
    return out


def _assert_identical(a, b, label, ignore=()):
    assert set(a) == set(b), f"{label}: keys {sorted(set(a) ^ set(b))}"
    for key in a:
        if key in ignore:
            continue
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{label}: {key} dtype/shape"
        assert torch.equal(x, y), f"{label}: {key} differs, max |diff| {(x.double() - y.double()).abs().max():.3g}"


def _plain_run(case, backend, steps=STEPS, leave_out=()):
    net, opt, loss = _setup(case, backend)
    for s in range(steps):
        opt.zero_grad()
        loss().backward()
        if s not in leave_out:
            opt.step()
    return opt


def _skipped_key(state):
    return [k for k in state if k.endswith(".skipped")]


# -------------------------------------------------------------------------------------------
# 1. exactness
@pytest.mark.parametrize("name", [c[0] for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_is_exact(backend, name):
    case = _case(name)
    net, opt, loss = _setup(case, backend)
    seen, scaler = _spy(opt), _scaler()
    for _ in range(STEPS):
        opt.zero_grad()
        scaler.scale(loss()).backward()
        scaler.step(opt)
        scaler.update()
    assert seen == [SCALE] * STEPS  # the optimizer was handed scaled gradients every step
    plain = _plain_run(case, backend)
    _assert_identical(_full_state(opt), _full_state(plain), f"{name} {backend}: GradScaler vs plain")
    assert opt.skipped_steps() == [0]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_rates_move(name):
    """The cases' hyper-gradient rates move every level (so exactness is not vacuous)."""
    backend = "reference" if "reference" in ALL_BACKENDS else BACKENDS[0]
    opt = _plain_run(_case(name), backend)
    lr = _case(name)[2]["lr"]
    for level, value in opt.rates()[0].items():
        values = value if isinstance(value, list) else [value]
        if level == "weights":
            continue
        moved = max(float((v.double() - lr).abs().max()) for v in values) / lr
        assert moved > 1e-2, f"{name}: {level} rates moved only {moved:.2g} (relative)"


# -------------------------------------------------------------------------------------------
# 2. an overflow skips exactly one step
BAD_STEP = 2


@pytest.mark.parametrize("skip_nonfinite", [True, False], ids=["guard", "no-guard"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_skips_exactly_that_step(backend, skip_nonfinite):
    """An Inf in one gradient: GradScaler's found_inf skips the step (even with the
    optimizer's own non-finite guard off) and nothing moves: params, per-param state
    (step counts included), rates, weights, t; the skip counter grows by one, the scale
    halves; later steps go on as if the step had been left out."""
    case = _case("adam-all-levels")
    net, opt, loss = _setup(case, backend, skip_nonfinite=skip_nonfinite)
    scaler = _scaler()
    params = list(net.parameters())
    for s in range(STEPS):
        opt.zero_grad()
        scaler.scale(loss()).backward()
        if s == BAD_STEP:
            params[0].grad.view(-1)[3] = math.inf
            before, scale = _full_state(opt), scaler.get_scale()
        scaler.step(opt)
        if s == BAD_STEP:
            after = _full_state(opt)
            _assert_identical(after, before, f"{backend}: the skipped step", ignore=_skipped_key(after))
            assert opt.skipped_steps() == [1]
        scaler.update()
        if s == BAD_STEP:
            assert scaler.get_scale() == scale / 2
    assert opt.skipped_steps() == [1]
    plain = _plain_run(case, backend, leave_out={BAD_STEP})
    state, plain_state = _full_state(opt), _full_state(plain)
    _assert_identical(state, plain_state, f"{backend}: overflow run vs plain run without that step",
                      ignore=_skipped_key(state))
    assert not torch.equal(state["param[0]"], before["param[0]"])  # the later steps did step


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_is_exact_float64_and_mixed(backend):
    """float64 parameters, and a float32 one in their group (its own bucket, with a float32
    factor): still bit-identical to the plain loop."""
    shapes = (((3, 4), False), ((4,), False), ((2, 3), False))
    runs = []
    for scaler in (_scaler(), None):
        params = make_params(torch.float64, DEVICE, 0, shapes)
        params[1] = params[1].detach().float().requires_grad_()
        opt = mlhd.MultiLevelAdam(params, backend=backend, lr=0.01, hypergrad_rule="additive", hypergrad_lr=1e-4,
                                  levels=LEVELS, weight_decay=0.1, maximize=True, **IN_STEP)
        gradfn = GradFn(shapes, sign=-1.0)
        for s in range(STEPS):
            opt.zero_grad()
            loss = sum((p * g.detach()).sum() for p, g in zip(params, gradfn.grads(s, params)))
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        runs.append(_full_state(opt))
    _assert_identical(*runs, f"{backend}: float64 + float32 group, GradScaler vs plain")


# -------------------------------------------------------------------------------------------
# 3. unscale_ first (gradient clipping): grad_scale is None
UNSCALE_CASE = ("sgd-nesterov-maximize-decay", "SGD",
                dict(lr=0.05, momentum=0.9, nesterov=True, hypergrad_lr=1e-3, levels=("global", "unit", "param"),
                     weight_decay=0.05, maximize=True), -1.0)


def _clipped_run(backend, scaler=None):
    net, opt, loss = _setup(UNSCALE_CASE, backend)
    seen = _spy(opt)
    for _ in range(STEPS):
        opt.zero_grad()
        if scaler is None:
            loss().backward()
        else:
            scaler.scale(loss()).backward()
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.5)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return opt, seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_then_clip(backend):
    """The clipping recipe: GradScaler hands step() grad_scale None, and the result is the
    plain loop's (the same backend's up to rounding, and the reference's to float32 rounding)."""
    opt, seen = _clipped_run(backend, _scaler())
    assert seen == [None] * STEPS
    a = _full_state(opt)
    for other, rtol, atol in ((backend, 1e-6, 1e-9), ("reference", 1e-4, 1e-6)):
        if other not in BACKENDS:
            continue
        b = _full_state(_clipped_run(other)[0])
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{backend} vs plain {other}: {key}: {m}")


# -------------------------------------------------------------------------------------------
# 4. half precision parameters
HALF_CASES = [
    ("Adam", dict(lr=0.01, hypergrad_rule="additive", hypergrad_lr=3e-6, levels=LEVELS, init_weights=(1, 2, 3, 4))),
    ("SGD", dict(lr=0.05, momentum=0.9, hypergrad_rule="additive", hypergrad_lr=1e-5, levels=("global", "unit", "param"))),
]
# Measured on the CPU (cpp, torch, triton vs reference, 6 steps): parameters identical,
# rates within 2e-8 and weights within 4e-7, while the rates move by 5e-4 to 2e-2 and the
# factor 2**12 of a missed unscale changes everything. Allowed: about two half-precision
# ulps in the parameters (another device may round a step differently), and float32
# rounding in the rates and weights.
TOL_HALF = {torch.float16: Tol(rtol=2e-3, atol_param=2e-3, atol_rate=1e-6, atol_weight=1e-5),
            torch.bfloat16: Tol(rtol=1.6e-2, atol_param=1.6e-2, atol_rate=1e-6, atol_weight=1e-5)}


def _half_run(cls, kw, backend, dtype, shapes, steps=6):
    """GradFn's gradients, produced by backward through GradScaler: grad = scale * g."""
    params = make_params(dtype, DEVICE, 0, shapes)
    opt = CLASSES[cls](params, backend=backend, **kw, **IN_STEP)
    gradfn, scaler, snaps = GradFn(shapes), _scaler(), []
    for s in range(steps):
        opt.zero_grad()
        grads = gradfn.grads(s, params)
        loss = sum((p * g.detach()).sum() for p, g in zip(params, grads))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        snaps.append(opt_snapshot(opt))
    assert opt.skipped_steps() == [0]
    return snaps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("cls,kw", HALF_CASES, ids=[c for c, _ in HALF_CASES])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision_with_grad_scaler(backend, cls, kw, dtype):
    shapes = shapes_for(backend)
    fast = _half_run(cls, kw, backend, dtype, shapes)
    ref = _half_run(cls, kw, "reference", dtype, shapes)
    assert_trajectories_close(fast, ref, TOL_HALF[dtype], label=f"{cls} {backend}/{dtype} vs reference")


# -------------------------------------------------------------------------------------------
# 5. who unscales: torch.optim's convention by default
@pytest.mark.parametrize("fused,choice,declared", [
    (None, None, False), (True, None, True), (None, True, True), (True, False, False)])
def test_in_step_unscaling_is_declared_as_torch_optim_does(fused, choice, declared):
    """Declared exactly when fused=True unless amp_unscale_in_step says otherwise (Lightning
    reads the attribute to decide whether it may clip); copies keep it."""
    opt = mlhd.MultiLevelAdamW(_net()[0].parameters(), fused=fused, amp_unscale_in_step=choice)
    assert opt._step_supports_amp_scaling is declared
    assert copy.deepcopy(opt)._step_supports_amp_scaling is declared
    with pytest.raises(TypeError, match="amp_unscale_in_step"):
        mlhd.MultiLevelSGD(_net()[0].parameters(), amp_unscale_in_step=1)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_default_lets_the_scaler_unscale(backend):
    """Without the declaration GradScaler unscales in a pass of its own and hands step()
    nothing; an overflow step is skipped by the scaler; the run is the plain loop's, bit for
    bit, as the in-step one is (a power-of-two scale unscales exactly)."""
    case = _case("sgd-nesterov-coupled-decay")
    net, opt, loss = _setup(case, backend, amp_unscale_in_step=None)
    seen, scaler = _spy(opt), _scaler()
    for s in range(STEPS):
        opt.zero_grad()
        scaler.scale(loss()).backward()
        if s == BAD_STEP:
            next(net.parameters()).grad.view(-1)[0] = math.inf
        scaler.step(opt)
        scaler.update()
    assert seen == ["unset"] * (STEPS - 1)  # step() not called at the overflow, never handed a scale
    plain = _plain_run(case, backend, leave_out={BAD_STEP})
    _assert_identical(_full_state(opt), _full_state(plain), f"{backend}: scaler-unscaled vs plain")
