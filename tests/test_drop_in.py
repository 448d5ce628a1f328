"""A drop-in for torch.optim (docs/algorithm.md section 4, README "What the one-word change keeps"): every keyword of the
torch.optim twin, which backend runs, a tensor lr, deepcopy and pickle, a warm start from the
twin's state dict."""
from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import multilevel_hd as mlhd
from cases import ALL_LEVELS
from conftest import ALL_BACKENDS, DEVICE, FAST_BACKENDS, is_slow, shapes_for
from multilevel_hd import backends
from trajectory import (TOL_F64, GradFn, assert_bitwise_equal_snapshots, assert_trajectories_close, make_params,
                        params_snapshot, run_optimizer)

BACKENDS = ["reference"] + FAST_BACKENDS

TWINS = {mlhd.MultiLevelSGD: torch.optim.SGD, mlhd.MultiLevelAdam: torch.optim.Adam,
         mlhd.MultiLevelAdamW: torch.optim.AdamW}


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))]


# -- every keyword of the twin ---------------------------------------------------------------
@pytest.mark.parametrize("cls", list(TWINS), ids=lambda c: c.__name__)
def test_every_keyword_of_the_twin_is_accepted(cls):
    """Each keyword of torch.optim's signature, with the twin's default and with another value
    torch.optim accepts (differentiable only False: see below), lands in the group options."""
    twin = inspect.signature(TWINS[cls]).parameters
    names = [n for n in twin if n != "params"]
    ours = inspect.signature(cls).parameters
    assert not [n for n in names if n not in ours and "kwargs" not in ours], names
    other = dict(foreach=True, fused=False, capturable=True, amsgrad=True, maximize=True, nesterov=True,
                 momentum=0.9, decoupled_weight_decay=True, weight_decay=0.1, lr=0.01)
    for values in ({n: twin[n].default for n in names},
                   {n: other.get(n, twin[n].default) for n in names if n != "fused"}):
        opt = cls(_params(), **values)
        group = opt.param_groups[0]
        for n, v in values.items():
            assert group[n] == v, n


@pytest.mark.parametrize("cls", list(TWINS), ids=lambda c: c.__name__)
def test_positional_arguments_as_the_twin(cls):
    """torch.optim.Adam/AdamW take amsgrad sixth; SGD's first four are the twin's, and its fifth
    (weight_decay in the twin, nesterov here) cannot be silently misread."""
    if cls is mlhd.MultiLevelSGD:
        opt = cls(_params(), 0.05, 0.9, 0.1)
        assert [opt.defaults[k] for k in ("lr", "momentum", "dampening")] == [0.05, 0.9, 0.1]
        # docs/algorithm.md's fifth is nesterov, the twin's weight_decay: a number there is not taken for True
        with pytest.raises(TypeError, match="weight_decay by keyword"):
            cls(_params(), 0.05, 0.9, 0.0, 1e-4)
    else:
        opt = cls(_params(), 0.01, (0.8, 0.9), 1e-6, 0.2, True)
        assert [opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")] == [
            0.01, (0.8, 0.9), 1e-6, 0.2, True]


def test_differentiable_raises_not_implemented():
    for cls in TWINS:
        with pytest.raises(NotImplementedError, match="differentiable=True"):
            cls(_params(), differentiable=True)
    opt = mlhd.MultiLevelAdam(_params())
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.ones(2))], differentiable=True))
    assert len(opt.param_groups) == 1


CPU_AUTO = "cpp" if "cpp" in ALL_BACKENDS else "torch"


@pytest.mark.parametrize("flags,expected", [
    (dict(), CPU_AUTO),
    (dict(foreach=True), CPU_AUTO),
    (dict(foreach=None, fused=None), CPU_AUTO),
    (dict(foreach=False), "torch"),
    (dict(fused=False), "torch"),
    (dict(fused=True), "cpp"),
], ids=str)
def test_fused_and_foreach_choose_the_backend(flags, expected):
    """auto resolves with torch.optim's flags in mind (README: fused=True a fused backend,
    fused=False / foreach=False the torch backend); the step runs that backend."""
    if expected == "cpp" and "cpp" not in ALL_BACKENDS:
        with pytest.raises(RuntimeError, match="fused=True"):
            mlhd.MultiLevelAdam(_params(), **flags).backends()
        return
    ps = _params()
    opt = mlhd.MultiLevelAdam(ps, **flags)
    assert opt.backends() == [expected]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt._backends[0].name == expected


@pytest.mark.parametrize("backend,flags,error", [
    ("torch", dict(fused=True), ValueError),
    ("reference", dict(fused=True), ValueError),
    ("cpp", dict(fused=False), ValueError),
    ("cpp", dict(foreach=False), ValueError),
    ("auto", dict(fused=True, foreach=True), RuntimeError),  # torch.optim's own error
], ids=str)
def test_contradicting_flags_raise(backend, flags, error):
    with pytest.raises(error, match="fused|foreach"):
        mlhd.MultiLevelSGD(_params(), backend=backend, **flags)


def test_fused_true_accepts_a_named_fused_backend_and_foreach_true_any():
    assert mlhd.MultiLevelAdam(_params(), backend="torch", foreach=True).backends() == ["torch"]
    if "cpp" in ALL_BACKENDS:
        assert mlhd.MultiLevelAdam(_params(), backend="cpp", fused=True).backends() == ["cpp"]


# -- which backend runs -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto"] + ALL_BACKENDS)
def test_backends_and_repr_name_each_groups_backend(backend):
    """backend="auto" used to resolve silently (the group still says "auto"): backends() and
    repr() name what runs, per group (here a second group asks for the torch backend)."""
    expected = backends.resolve_backend(backend, "cpu")
    opt = mlhd.MultiLevelSGD([dict(params=_params()), dict(params=_params(), backend="torch")],
                             backend=backend)
    assert opt.backends() == [expected, "torch"]
    text = repr(opt)
    assert text.count("resolved backend:") == 2
    assert f"resolved backend: {expected}\n" in text and text.endswith("resolved backend: torch\n)")
    assert "Parameter Group 1" in text and "    momentum: 0.0" in text  # torch.optim's listing


def test_repr_of_a_backend_that_cannot_run_says_why():
    opt = mlhd.MultiLevelSGD([torch.nn.Parameter(torch.empty(3, device="meta"))], backend="cpp")
    assert "resolved backend: none (backend 'cpp' cannot run on meta" in repr(opt)
    with pytest.raises(RuntimeError, match="cannot run on meta"):
        opt.backends()


# -- lr as a tensor ---------------------------------------------------------------------------
def _warmup(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1 / (1 + epoch))


@pytest.mark.parametrize("cls", [mlhd.MultiLevelAdam, mlhd.MultiLevelSGD], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_is_torch_optim_under_a_scheduler(backend, cls):
    """A 0-d tensor lr, filled in place by an LR scheduler, steps exactly as torch.optim with
    the same tensor lr (hypergrad_lr=0, float64 params; float32 for triton, which steps float64
    with the torch backend)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    shapes = shapes_for(backend)
    ours, theirs = make_params(dtype, shapes=shapes), make_params(dtype, shapes=shapes)
    kw = dict(momentum=0.9) if cls is mlhd.MultiLevelSGD else {}
    lr = torch.tensor(0.02, dtype=dtype)
    opt = cls(ours, lr=lr, hypergrad_lr=0.0, backend=backend, **kw)
    ref = TWINS[cls](theirs, lr=lr.clone(), **kw)
    scheds = [_warmup(opt), _warmup(ref)]
    gf = GradFn(shapes)
    for s in range(5):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            p.grad, q.grad = gf.grad(s, i, p), gf.grad(s, i, q)
        opt.step()
        ref.step()
        for sched in scheds:
            sched.step()
        tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, **tol, msg=lambda m: f"step {s}: {m}")
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.02 / 6)  # filled in place


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_with_hypergradients_is_the_float_lr_run(backend):
    """With learned rates (every level, default hypergrad rule) and a scheduler, a tensor lr
    gives the float lr's trajectory: the scheduler's factor reaches the hyper-gradient too."""
    shapes = shapes_for(backend)
    kw = dict(levels=ALL_LEVELS, hypergrad_lr=1e-4, init_weights=(1, 2, 3, 4), backend=backend)
    runs = []
    for lr in (0.02, torch.tensor(0.02, dtype=torch.float64)):
        opt = mlhd.MultiLevelAdam(make_params(shapes=shapes), lr=lr, **kw)
        runs.append(run_optimizer(opt, GradFn(shapes), 6, scheduler=_warmup(opt)))
    assert_trajectories_close(runs[1], runs[0], TOL_F64, label=f"tensor lr, {backend}")


class _HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (`.item()`, `float(t)`, `bool(t)`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton"])
def test_tensor_lr_is_never_read_in_a_step(backend):
    """The step reads no tensor value on the host, the tensor lr's included (on a GPU that
    would wait for the device): checked at the first step (state, plan and options made) and
    after the scheduler changed lr."""
    shapes = shapes_for(backend)
    ps = make_params(torch.float32, shapes=shapes)
    opt = mlhd.MultiLevelAdam(ps, lr=torch.tensor(0.01), levels=ALL_LEVELS, backend=backend)
    sched, gf = _warmup(opt), GradFn(shapes)
    for s in range(3):
        for i, p in enumerate(ps):
            p.grad = gf.grad(s, i, p)
        with _HostReads() as reads:
            opt.step()
        assert reads.count == 0, f"step {s}: {reads.count} host reads"
        sched.step()


def test_tensor_lr_must_have_one_element():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        mlhd.MultiLevelAdam(_params(), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        mlhd.MultiLevelSGD(_params(), lr=torch.tensor(-0.1))


# -- copies -----------------------------------------------------------------------------------
def _copy(how, opt):
    if how == "deepcopy":
        return copy.deepcopy(opt)
    if how == "pickle":
        return pickle.loads(pickle.dumps(opt))
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)  # a whole object, not a state dict
    params = [p for g in opt.param_groups for p in g["params"]]  # the model's, copied with it (EMA, SWA)
    params_copy, opt_copy = copy.deepcopy((params, opt))
    assert all(p is q for p, q in zip([p for g in opt_copy.param_groups for p in g["params"]], params_copy))
    return opt_copy


COPY_CONFIGS = {
    # per-parameter state, moved rates of every level, moved weights, t, skipped steps
    "adam": (mlhd.MultiLevelAdam, dict(lr=0.01, hypergrad_lr=1e-4, levels=ALL_LEVELS, init_weights=(1, 2, 3, 4),
                                       amsgrad=True, betas=(0.9, 0.9))),
    "sgd": (mlhd.MultiLevelSGD, dict(lr=0.05, momentum=0.9, nesterov=True, hypergrad_rule="multiplicative",
                                     hypergrad_lr=0.05, levels=("global", "layer", "param"))),
}


COPY_HOWS = ["deepcopy", "pickle", "torch.save", "with the model"]
# how a copy is made does not depend on the backend: a slow one (triton's interpreter) is
# copied one way per configuration
COPY_RUNS = [(b, c, h) for b in BACKENDS for i, c in enumerate(COPY_CONFIGS) for j, h in enumerate(COPY_HOWS)
             if not is_slow(b) or j == 2 * i + 1]


@pytest.mark.parametrize("backend,config,how", COPY_RUNS, ids=["-".join(r) for r in COPY_RUNS])
def test_a_copy_continues_bit_for_bit(backend, config, how):
    """A copy made after some steps (two param groups; a NaN step skipped) continues exactly
    as the original, on copies of the parameters; the original is untouched by the copy's
    steps. (torch.optim's own pickling kept only defaults, state and param_groups, and the copy
    failed at its first step.)"""
    cls, kw = COPY_CONFIGS[config]
    shapes = shapes_for(backend)
    ps = make_params(torch.float32, shapes=shapes)
    opt = cls([dict(params=ps[:3]), dict(params=ps[3:], lr=kw["lr"] / 2)], backend=backend, **kw)
    gf = GradFn(shapes, poison={(2, 1): float("nan")})
    run_optimizer(opt, gf, 4)
    twin = _copy(how, opt)
    assert {k for k in vars(twin) if not k.startswith("_")} == {k for k in vars(opt) if not k.startswith("_")}
    assert twin.skipped_steps() == opt.skipped_steps() == [1, 0]
    before = [p.detach().clone() for p in ps]
    theirs = run_optimizer(twin, gf, 4, start=4)
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    ours = run_optimizer(opt, gf, 4, start=4)
    assert_bitwise_equal_snapshots(theirs, ours, label=f"{how} copy")
    assert repr(twin) == repr(opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_copy_before_the_first_step(backend):
    shapes = shapes_for(backend)
    opt = mlhd.MultiLevelAdam(make_params(shapes=shapes), lr=0.01, hypergrad_lr=1e-4, backend=backend)
    twin = pickle.loads(pickle.dumps(opt))
    assert_bitwise_equal_snapshots(run_optimizer(twin, GradFn(shapes), 3), run_optimizer(opt, GradFn(shapes), 3))


# -- a warm start from the torch.optim twin's state dict --------------------------------------
TWIN_CONFIGS = {
    "adam-amsgrad": (mlhd.MultiLevelAdam, torch.optim.Adam, dict(lr=0.01, betas=(0.9, 0.9), amsgrad=True)),
    "adamw": (mlhd.MultiLevelAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "sgd-nesterov": (mlhd.MultiLevelSGD, torch.optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    "sgd": (mlhd.MultiLevelSGD, torch.optim.SGD, dict(lr=0.02)),
}
SWITCH_AT, MORE = 4, 5


def _twin_run(config, shapes, scheduler=None):
    """The twin after SWITCH_AT steps (two groups; a tensor without a gradient at first, so
    step counts differ), its state dict, and its scheduler's."""
    _, twin_cls, kw = TWIN_CONFIGS[config]
    ps = make_params(shapes=shapes)
    twin = twin_cls([dict(params=ps[:3]), dict(params=ps[3:], lr=kw["lr"] / 2)], foreach=False, **kw)
    sched = scheduler(twin) if scheduler else None
    run_optimizer(twin, GradFn(shapes, none={(0, 4), (1, 4)}), SWITCH_AT, scheduler=sched, snapshot=params_snapshot)
    return ps, twin, sched


def _switch(config, backend, ps, twin, twin_sched=None, **kw):
    """A multi-level optimizer on copies of the twin's parameters, loaded from its state dict
    (and a scheduler from the twin's, made before loading as in any resume); constructed with
    another lr (the twin's replaces it) and its own levels."""
    cls = TWIN_CONFIGS[config][0]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = cls([dict(params=qs[:3]), dict(params=qs[3:])], lr=0.5, levels=("global", "unit", "param"),
              backend=backend, **kw)
    sched = _warmup(opt) if twin_sched else None
    opt.load_state_dict(copy.deepcopy(twin.state_dict()))
    if sched:
        sched.load_state_dict(twin_sched.state_dict())
    return opt, sched


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant-lr", "scheduled"])
@pytest.mark.parametrize("config", list(TWIN_CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_twin_state_dict_continues_as_torch_optim(backend, config, scheduled):
    """A run switches from torch.optim mid-training: moments, momentum buffers,
    max_exp_avg_sq and step counts carry over (keys as torch.optim's), every rate starts at
    its group's lr, and with hypergrad_lr=0 the continued run is the twin's continuation (also
    under the twin's LR scheduler, its state loaded)."""
    shapes = shapes_for(backend)
    ps, twin, twin_sched = _twin_run(config, shapes, _warmup if scheduled else None)
    opt, sched = _switch(config, backend, ps, twin, twin_sched, hypergrad_lr=0.0)
    twin_state = twin.state_dict()["state"]
    ours = opt.state_dict()
    for pid, saved in twin_state.items():
        assert set(saved) <= set(ours["state"][pid]), (set(saved), set(ours["state"][pid]))
        for key, value in saved.items():
            assert torch.equal(torch.as_tensor(ours["state"][pid][key]).double(), value.double()), key
    lrs = [g["lr"] for g in twin.param_groups]
    for rates, lr in zip(opt.rates(), [g.get("initial_lr", g["lr"]) for g in twin.param_groups]):
        for level in ("global", "unit", "param"):
            for r in (rates[level] if isinstance(rates[level], list) else [rates[level]]):
                assert torch.all(r == lr), level
    assert [g["lr"] for g in opt.param_groups] == lrs
    gf = GradFn(shapes)
    theirs = run_optimizer(twin, gf, MORE, start=SWITCH_AT, scheduler=twin_sched, snapshot=params_snapshot)
    mine = run_optimizer(opt, gf, MORE, start=SWITCH_AT, scheduler=sched)
    for s, (a, b) in enumerate(zip(mine, theirs)):
        for x, y in zip(a["params"], b["params"]):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14, msg=lambda m: f"step {s}: {m}")


@pytest.mark.parametrize("config", ["adam-amsgrad", "sgd-nesterov"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_twin_state_dict_with_learned_rates_matches_the_reference(backend, config):
    """With hyper-gradients on, a run loaded from the twin continues on every backend as on the
    reference backend, and its rates move from the twin's lr."""
    shapes = shapes_for(backend)
    ps, twin, _ = _twin_run(config, shapes)
    runs = [run_optimizer(_switch(config, name, ps, twin, hypergrad_lr=1e-3)[0], GradFn(shapes), MORE, start=SWITCH_AT)
            for name in (backend, "reference")]
    assert_trajectories_close(runs[0], runs[1], TOL_F64, label=f"{config} from the twin, {backend}")
    assert float(runs[1][-1]["rates"][0]["global"]) != twin.param_groups[0]["lr"]


def test_twin_state_dict_keeps_this_optimizers_backend():
    """The twin's foreach / fused are how it ran, not state: loading keeps this optimizer's."""
    ps, twin, _ = _twin_run("adamw", shapes_for("torch"))
    assert twin.param_groups[0]["foreach"] is False
    opt, _ = _switch("adamw", "auto", ps, twin)
    assert opt.backends() == [CPU_AUTO] * 2 and opt.param_groups[0]["foreach"] is None


@pytest.mark.parametrize("cls,twin_cls", [(mlhd.MultiLevelAdam, torch.optim.SGD), (mlhd.MultiLevelSGD, torch.optim.AdamW),
                                          (mlhd.MultiLevelSGD, torch.optim.RMSprop), (mlhd.MultiLevelAdam, torch.optim.NAdam)])
def test_state_dict_of_another_torch_optim_optimizer_raises(cls, twin_cls):
    ps = _params()
    other = twin_cls(ps, lr=0.01)
    for p in ps:
        p.grad = torch.ones_like(p)
    other.step()
    opt = cls(_params())
    with pytest.raises(ValueError, match="state dict is from a"):
        opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropped_state_starts_afresh_as_torch_optim(backend):
    """A parameter whose state is removed between steps (`opt.state.pop(p)`) starts again from a
    fresh state at its next step while the others continue, as torch.optim.Adam does
    (hypergrad_lr=0: exactly Adam). step() makes only the states its checks found missing."""
    device = "cpu" if backend == "reference" else DEVICE
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device)),
          torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64).to(device))]
    twin_ps = copy.deepcopy(ps)
    opt = mlhd.MultiLevelAdam(ps, lr=0.01, hypergrad_lr=0.0, backend=backend)
    twin = torch.optim.Adam(twin_ps, lr=0.01)
    for step in range(4):
        if step == 2:
            opt.state.pop(ps[0])
            twin.state.pop(twin_ps[0])
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device) for p in ps]
        for o, params in ((opt, ps), (twin, twin_ps)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    assert [opt.state[p]["step"].item() for p in ps] == [2.0, 4.0]
    for p, q in zip(ps, twin_ps):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_cannot_change_after_the_first_step(backend):
    """The state has no vmax to continue from (or one that would go stale): turning amsgrad on
    or off after a parameter's first step raises and leaves everything as it was."""
    shapes = shapes_for(backend)
    for first, then in ((False, True), (True, False)):
        ps = make_params(shapes=shapes)
        opt = mlhd.MultiLevelAdam(ps, lr=0.01, amsgrad=first, backend=backend)
        run_optimizer(opt, GradFn(shapes), 2)
        before = copy.deepcopy((opt.state_dict(), ps))
        opt.param_groups[0]["amsgrad"] = then
        with pytest.raises(ValueError, match="amsgrad"):
            opt.step()
        opt.param_groups[0]["amsgrad"] = first
        after = (opt.state_dict(), ps)
        assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
        assert all(torch.equal(before[0]["state"][k][n], after[0]["state"][k][n])
                   for k in before[0]["state"] for n in before[0]["state"][k])
