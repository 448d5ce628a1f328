"""The generic properties of PyTorch's own optimizer test-suite (TestOptimRenewed in pytorch's
test/test_optim.py, driven by the OptimizerInfo entries of
torch/testing/_internal/common_optimizers.py), written afresh for MultiLevelAdam, AdamW and
SGD on every CPU backend, each in two modes: `twin` (hypergrad_lr=0, where the optimizer is
its torch.optim twin, and where the tests also compare against the twin) and `defaults`
(every multi-level option at its default).

`SPECS` plays OptimizerInfo's part: per class, the option sets (torch's optim_inputs_func)
and the LR scheduler combinations (scheduler_inputs) the tests run. The Triton backend runs
under its interpreter at ~50 ms a step, so it runs only the right-direction test.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import pytest
import torch
from torch.optim.lr_scheduler import ExponentialLR, LinearLR, ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import multilevel_hd as mlhd
from conftest import FAST_BACKENDS
from trajectory import TOL_F32, TOL_F64, GradFn, assert_trajectories_close, run_optimizer


@dataclass(frozen=True)
class Spec:
    cls: type
    twin: type
    inputs: tuple  # option sets, as OptimizerInfo.optim_inputs_func gives them
    schedulers: tuple = (  # LR scheduler combinations, as OptimizerInfo.scheduler_inputs
        (lambda o: StepLR(o, gamma=0.9, step_size=10),),
        (lambda o: LinearLR(o, start_factor=0.4, total_iters=6), lambda o: ExponentialLR(o, gamma=0.9)),
        (lambda o: ReduceLROnPlateau(o, patience=2),),
    )


SPECS = {
    "Adam": Spec(mlhd.MultiLevelAdam, torch.optim.Adam, (
        dict(lr=0.05), dict(lr=0.05, weight_decay=0.1, amsgrad=True), dict(lr=0.05, maximize=True),
        dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True))),
    "AdamW": Spec(mlhd.MultiLevelAdamW, torch.optim.AdamW, (dict(lr=0.05), dict(lr=0.05, amsgrad=True, maximize=True))),
    "SGD": Spec(mlhd.MultiLevelSGD, torch.optim.SGD, (
        dict(lr=0.01), dict(lr=0.01, momentum=0.9, dampening=0.2, weight_decay=0.1),
        dict(lr=0.01, momentum=0.9, nesterov=True), dict(lr=0.01, maximize=True))),
}
MODES = {"twin": dict(hypergrad_lr=0.0), "defaults": {}}
F32 = dict(rtol=TOL_F32.rtol, atol=TOL_F32.atol_param)  # float32 runs against the twin
BACKENDS = [b for b in FAST_BACKENDS if b != "triton"]

every = pytest.mark.parametrize("mode", list(MODES))
classes = pytest.mark.parametrize("name", list(SPECS))
backends = pytest.mark.parametrize("backend", BACKENDS)


def make(name, backend, mode, params, **kw):
    return SPECS[name].cls(params, backend=backend, **MODES[mode], **{**SPECS[name].inputs[0], **kw})


def weight_bias(contiguous=True, dtype=torch.float32, seed=0):
    """torch's test problem: a Linear weight and bias (non-contiguous: every other element)."""
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        return (torch.nn.Parameter(torch.randn(10, 5, generator=gen, dtype=dtype)),
                torch.nn.Parameter(torch.randn(10, generator=gen, dtype=dtype)))
    return (torch.nn.Parameter(torch.randn(10, 5, 2, generator=gen, dtype=dtype)[..., 0]),
            torch.nn.Parameter(torch.randn(10, 2, generator=gen, dtype=dtype)[..., 0]))


def closure_for(opt, weight, bias):
    x = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=weight.dtype)

    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


def train(opt, weight, bias, steps=20, schedulers=()):
    """`steps` steps with a closure and the schedulers; the loss before and after."""
    closure = closure_for(opt, weight, bias)
    first = closure().item()
    for _ in range(steps):
        loss = opt.step(closure)
        for s in schedulers:
            s.step(loss.detach()) if isinstance(s, ReduceLROnPlateau) else s.step()
    return first, closure().item()


def equal(a, b) -> bool:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


# -- repr -----------------------------------------------------------------------------------
@every
@classes
@backends
def test_repr(backend, name, mode):
    """torch.optim's listing (every option of the twin among them) and the group's backend."""
    w, b = weight_bias()
    text = repr(make(name, backend, mode, [w, b]))
    twin = SPECS[name].twin([w, b], **SPECS[name].inputs[0])
    assert text.startswith(SPECS[name].cls.__name__ + " (\nParameter Group 0\n")
    for key in twin.param_groups[0]:
        assert key == "params" or f"\n    {key}: " in text, key
    assert text.endswith(f"    resolved backend: {backend}\n)")


# -- goes the right direction -----------------------------------------------------------------
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@every
@classes
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_goes_right_direction(backend, name, mode, contiguous):
    """Every option set lowers the loss in 20 steps (raises it with maximize); in twin mode the
    parameters are the twin's."""
    inputs = SPECS[name].inputs[:1] if backend == "triton" else SPECS[name].inputs
    for kw in inputs:
        assert_right_direction(name, backend, mode, kw, contiguous=contiguous)


def assert_right_direction(name, backend, mode, kw, contiguous=True, schedulers=()):
    """20 steps with options `kw` (under `schedulers`) lower the loss, or raise it with
    maximize; in twin mode the parameters are those of the twin under the same schedulers."""
    w, b = weight_bias(contiguous)
    opt = make(name, backend, mode, [w, b], **kw)
    first, last = train(opt, w, b, schedulers=[s(opt) for s in schedulers])
    assert last > first if kw.get("maximize") else last < first, kw
    if mode == "twin":
        v, c = weight_bias(contiguous)
        twin = SPECS[name].twin([v, c], **kw)
        train(twin, v, c, schedulers=[s(twin) for s in schedulers])
        torch.testing.assert_close((w, b), (v, c), **F32)


@every
@classes
@backends
def test_goes_right_direction_with_lr_schedulers(backend, name, mode):
    for schedulers in SPECS[name].schedulers:
        for kw in SPECS[name].inputs:
            assert_right_direction(name, backend, mode, kw, schedulers=schedulers)


@every
@classes
@backends
def test_param_groups_with_lr_scheduler_go_right_direction(backend, name, mode):
    """Two groups (the bias with its own lr), under each scheduler combination."""
    for schedulers in SPECS[name].schedulers:
        w, b = weight_bias()
        opt = make(name, backend, mode, [dict(params=[w]), dict(params=[b], lr=0.01)])
        first, last = train(opt, w, b, schedulers=[s(opt) for s in schedulers])
        assert last < first


# -- state dict -----------------------------------------------------------------------------
@every
@classes
@backends
def test_state_dict_is_deterministic_and_resumes(backend, name, mode):
    """A fresh optimizer on cloned parameters, loaded from a primed one's state dict, runs in
    lockstep with it bit for bit; loading leaves the dict unchanged, and the two state dicts
    are equal (deterministic for equal but not identical parameters), repeated groups
    included."""
    for kw in SPECS[name].inputs[:2]:
        w, b = weight_bias()
        opt = make(name, backend, mode, [w, b], **kw)
        train(opt, w, b)
        w2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (w, b))
        opt2 = make(name, backend, mode, [w2, b2], **kw)
        saved, kept = copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.state_dict())
        opt2.load_state_dict(saved)
        assert equal(saved, kept)
        closure, closure2 = closure_for(opt, w, b), closure_for(opt2, w2, b2)
        for _ in range(10):
            opt.step(closure)
            opt2.step(closure2)
            assert torch.equal(w, w2) and torch.equal(b, b2)
        assert equal(opt.state_dict(), opt2.state_dict())
        opt2.param_groups.extend(opt2.param_groups)
        assert equal(opt.state_dict()["param_groups"][-1], opt2.state_dict()["param_groups"][-1])


def assert_loaded_copy_continues(opt, w, b, state, name, backend, mode, **kw):
    """A new optimizer of the same kind on copies of w and b, loaded with `state`, takes the
    next 5 steps bit for bit as `opt` does."""
    w2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (w, b))
    opt2 = make(name, backend, mode, [w2, b2], **kw)
    opt2.load_state_dict(state)
    train(opt, w, b, steps=5)
    train(opt2, w2, b2, steps=5)
    assert torch.equal(w, w2) and torch.equal(b, b2)


@every
@classes
@backends
def test_save_load_with_weights_only(backend, name, mode):
    """torch.save of the state dict loads with torch.load(weights_only=True) (plain data only,
    a tensor lr included) and resumes bit for bit."""
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b], lr=torch.tensor(0.02))
    train(opt, w, b, steps=5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert equal(loaded, opt.state_dict())
    assert_loaded_copy_continues(opt, w, b, loaded, name, backend, mode, lr=torch.tensor(0.02))


@every
@classes
@backends
def test_older_state_dict_loads(backend, name, mode):
    """A checkpoint from before options existed (maximize, foreach, differentiable, levels
    missing from its groups) and with step counts saved as numbers loads and resumes
    exactly (docs/algorithm.md section 4: a missing option takes the constructor's value)."""
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b])
    train(opt, w, b, steps=5)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in ("maximize", "foreach", "differentiable", "levels"):
            del group[key]
    for state in old["state"].values():
        state["step"] = state["step"].item()
    assert_loaded_copy_continues(opt, w, b, old, name, backend, mode)


@every
@classes
@backends
def test_deepcopy_copies_all_public_attrs(backend, name, mode):
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b])
    train(opt, w, b, steps=3)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert {k for k in vars(copy.deepcopy(opt)) if not k.startswith("_")} == public
    assert {"defaults", "state", "param_groups", "group_states"} <= public


# -- hooks ----------------------------------------------------------------------------------
@every
@classes
@backends
def test_step_hooks_run_in_order(backend, name, mode):
    """Global and per-optimizer pre and post hooks around every step; removed ones stop."""
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b])
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    try:
        train(opt, w, b, steps=2)
    finally:
        for h in handles:
            h.remove()
    train(opt, w, b, steps=1)
    assert calls == ["global pre", "pre", "post", "global post"] * 2


@every
@classes
@backends
def test_state_dict_hooks(backend, name, mode):
    """state_dict pre/post hooks see and may extend the dict; load_state_dict pre hooks may
    rewrite it before loading, post hooks run after."""
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b])
    train(opt, w, b, steps=2)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "hooked": True})
    sd = opt.state_dict()
    assert seen == ["pre"] and sd["hooked"]

    def halve_lr(o, sd):
        for group in sd["param_groups"]:
            group["lr"] = group["lr"] / 2

    opt2 = make(name, backend, mode, [torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())])
    opt2.register_load_state_dict_pre_hook(halve_lr)
    opt2.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    opt2.load_state_dict(sd)
    assert seen[-1] == "loaded" and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] / 2


# -- steps that change nothing ------------------------------------------------------------------
@every
@classes
@backends
def test_step_is_a_no_op_without_grads(backend, name, mode):
    """No gradient anywhere: parameters, state and group states stay as they are, before and
    after some steps (zero_grad(set_to_none=True) drops the gradients)."""
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b])
    for steps in (0, 3):
        train(opt, w, b, steps=steps)
        opt.zero_grad(set_to_none=True)
        assert w.grad is None and b.grad is None
        before = copy.deepcopy((w, b, opt.state_dict()))
        opt.step()
        assert equal((w, b, opt.state_dict()), before)


@every
@classes
@backends
def test_first_step_with_zero_grads_is_a_no_op(backend, name, mode):
    """Zero gradients (zero_grad(set_to_none=False)) without weight decay: the parameters
    stay bit-identical (u = 0), while the step counts move."""
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b], weight_decay=0.0)
    closure_for(opt, w, b)()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros_like(w))
    before = (w.detach().clone(), b.detach().clone())
    opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert int(opt.state[w]["step"]) == 1


@every
@classes
@backends
def test_closure(backend, name, mode):
    """step(closure) calls it once, with grad enabled, and returns its loss."""
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b])
    inner = closure_for(opt, w, b)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return inner()

    loss = opt.step(closure)
    assert calls == [True] and isinstance(loss, torch.Tensor) and loss.requires_grad


# -- parameters and groups ------------------------------------------------------------------
@every
@classes
@backends
def test_add_param_group(backend, name, mode):
    """A group added after some steps takes the defaults and its own lr, and steps; in twin
    mode the whole run is the twin's doing the same. A parameter already in a group raises."""
    runs = []
    for cls in (None, SPECS[name].twin) if mode == "twin" else (None,):
        w, b = weight_bias()
        extra = torch.nn.Parameter(torch.ones(3))
        opt = make(name, backend, mode, [w, b]) if cls is None else cls([w, b], **SPECS[name].inputs[0])
        train(opt, w, b, steps=3)
        opt.add_param_group(dict(params=[extra], lr=0.03))
        assert opt.param_groups[1]["lr"] == 0.03 and opt.param_groups[1]["weight_decay"] == opt.defaults["weight_decay"]
        inner = closure_for(opt, w, b)

        def closure():
            loss = inner()  # (zero_grad() drops every gradient, the new group's too)
            extra.grad = extra.detach().clone()
            return loss

        for _ in range(3):
            opt.step(closure)
        assert not torch.equal(extra, torch.ones(3))
        with pytest.raises(ValueError, match="more than one parameter group"):
            opt.add_param_group(dict(params=[b]))
        runs.append((w, b, extra))
    if len(runs) == 2:
        torch.testing.assert_close(runs[0], runs[1], **F32)


@classes
def test_duplicate_params(name):
    """Within a group: torch.optim's warning; across groups: its ValueError."""
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        SPECS[name].cls([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        SPECS[name].cls([dict(params=[p]), dict(params=[p])])


@every
@classes
@backends
def test_channels_last_and_non_contiguous_params(backend, name, mode):
    """The same values as a contiguous tensor, a channels_last one and a strided view give the
    same trajectory (float64)."""
    runs = []
    for layout in ("contiguous", "channels_last", "strided"):
        conv = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        if layout == "channels_last":
            conv = conv.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            conv = torch.stack([conv, conv], -1)[..., 0]
        ps = [conv.requires_grad_()]
        opt = make(name, backend, mode, ps, levels=("global", "unit", "param"),
                   **({} if mode == "twin" else dict(hypergrad_lr=1e-3)))
        shapes = [((4, 3, 2, 2), False)]
        runs.append(run_optimizer(opt, GradFn(shapes), 6))
    assert_trajectories_close(runs[1], runs[0], TOL_F64, label="channels_last")
    assert_trajectories_close(runs[2], runs[0], TOL_F64, label="strided")


@every
@classes
@backends
def test_frozen_params_are_skipped(backend, name, mode):
    """A parameter with requires_grad=False never changes and gets no state; one frozen for a
    few steps (torch's _compare_between freezes a layer) keeps its state and step count
    meanwhile; in twin mode the run is the twin's."""
    runs = []
    for cls in (None, SPECS[name].twin) if mode == "twin" else (None,):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        fixed = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        params = [*model.parameters(), fixed]
        opt = make(name, backend, mode, params) if cls is None else cls(params, **SPECS[name].inputs[0])
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
        for i in range(7):
            model[2].requires_grad_(not 3 <= i < 5)
            opt.zero_grad(set_to_none=True)
            (model(x) + fixed).pow(2).sum().backward()
            frozen = model[2].weight.detach().clone()
            opt.step()
            if 3 <= i < 5:
                assert torch.equal(model[2].weight, frozen)
                assert int(opt.state[model[2].weight].get("step", 3)) == 3
        assert torch.equal(fixed, torch.ones(2)) and fixed not in opt.state
        runs.append(list(model.parameters()))
    if len(runs) == 2:
        torch.testing.assert_close(runs[0], runs[1], **F32)


@every
@classes
@backends
def test_bfloat16_params(backend, name, mode):
    """bf16 parameters stay bf16, their state is float32, the loss goes down."""
    w, b = weight_bias(dtype=torch.bfloat16)
    opt = make(name, backend, mode, [w, b])
    first, last = train(opt, w, b)
    assert last < first and w.dtype == b.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values())


@every
@classes
@backends
def test_zero_grad(backend, name, mode):
    w, b = weight_bias()
    opt = make(name, backend, mode, [w, b])
    closure_for(opt, w, b)()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    opt.zero_grad()  # set_to_none=True by default, as torch.optim
    assert w.grad is None and b.grad is None


@every
@classes
@backends
def test_tensor_lr(backend, name, mode):
    """A 0-d tensor lr gives the float lr's run (float64, so the two lrs are the same number),
    under a scheduler that fills it in place."""
    runs = []
    for lr in (0.02, torch.tensor(0.02, dtype=torch.float64)):
        w, b = weight_bias(dtype=torch.float64)
        opt = make(name, backend, mode, [w, b], lr=lr)
        train(opt, w, b, steps=10, schedulers=[StepLR(opt, step_size=3, gamma=0.5)])
        runs.append((w, b))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=0)


@classes
@backends
def test_complex_and_sparse_are_rejected(backend, name):
    with pytest.raises(ValueError, match="complex"):
        SPECS[name].cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], backend=backend)
    p = torch.nn.Parameter(torch.randn(4))
    opt = SPECS[name].cls([p], backend=backend)
    p.grad = torch.ones(4).to_sparse()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before) and not opt.state



# -- constructor errors -----------------------------------------------------------------------
def _twin_error_inputs(name):
    """PyTorch's own error inputs for the twin (its OptimizerInfo's optim_error_inputs_func)."""
    common = pytest.importorskip("torch.testing._internal.common_optimizers")
    func = common.optim_error_inputs_func_sgd if name == "SGD" else common.optim_error_inputs_func_adam
    return common, func(device="cpu", dtype=torch.float32)


@classes
def test_errors_are_the_twins(name):
    """Every error input of PyTorch's test_errors for the twin raises (or warns) the same type
    with a message its pattern matches, before the parameters are looked at (most pass
    params=None); the twin itself passes the same check, so the inputs are the ones it tests."""
    common, inputs = _twin_error_inputs(name)
    assert len(inputs) >= 6
    for cls in (SPECS[name].cls, SPECS[name].twin):
        for error in inputs:
            given = error.optimizer_error_input
            assert error.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR
            check = pytest.warns if issubclass(error.error_type, Warning) else pytest.raises
            with check(error.error_type, match=error.error_regex):
                cls(given.params, **given.kwargs)


def test_sgd_default_lr_is_the_twins():
    p = torch.nn.Parameter(torch.randn(3))
    assert mlhd.MultiLevelSGD([p]).defaults["lr"] == torch.optim.SGD([p]).defaults["lr"] == 1e-3
