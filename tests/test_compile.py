"""torch.compile (README, "torch.compile"), on the CPU.

* The torch backend's whole `step()` is one graph: Dynamo traces it without a graph break,
  at the first step (state created) and later, and a compiled training step (forward,
  backward, step) matches the eager one.
* The cpp backend's ops are traced through their registered schemas and fake
  implementations, and a compiled training step with them matches the eager one.
* A compiled model with the optimizer outside the graph works with every backend.
* An LR scheduler recompiles the step once, not at every step; a changed option is seen.

Compiled and eager runs are compared step by step within float32 tolerance (Inductor
reorders arithmetic). Models are tiny: what costs time is Inductor compiling C++.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import multilevel_hd as mlhd
from multilevel_hd.backends import available_backends
from trajectory import TOL_F32, assert_trajectories_close, opt_snapshot

if not os.environ.get("MLHD_TEST_DEVICE", "cpu").startswith("cpu"):
    pytest.skip("torch.compile is tested on the CPU", allow_module_level=True)

ALL = ("global", "layer", "unit", "param")
_WANT = [b.strip() for b in os.environ.get("MLHD_TEST_BACKENDS", "").split(",") if b.strip()]
CPU_BACKENDS = [b for b in available_backends("cpu") if b == "reference" or not _WANT or b in _WANT]
HAS_CPP = "cpp" in CPU_BACKENDS

CONFIGS = {
    # Adam, additive rule, every level, coupled weight decay and an annealed rate
    "adam": (mlhd.MultiLevelAdam, dict(lr=1e-2, levels=ALL, hypergrad_rule="additive", hypergrad_lr=1e-3,
                                       weight_decay=1e-2, hd_decay=0.05)),
    # SGD with Nesterov momentum, multiplicative rule, shrinkage, maximize (of -loss)
    "sgdn-mult": (mlhd.MultiLevelSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, levels=ALL,
                                           hypergrad_rule="multiplicative", hypergrad_lr=0.1,
                                           shrinkage={"unit": 0.1, "param": 0.2}, maximize=True)),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own functions (and never runs out of Dynamo's recompile limit,
    which would silently run a function eagerly)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(seed=0):
    """Three tensors (two layers, one with a bias): Inductor's compile time grows with them."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=False))


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)


def make_optimizer(config, model, backend, tensor_lr=False):
    cls, kw = CONFIGS[config]
    if tensor_lr:  # as torch.optim recommends under torch.compile
        kw = dict(kw, lr=torch.tensor(kw["lr"]))
    return cls(model.parameters(), backend=backend, **kw)


def training_step(model, opt):
    sign = -1.0 if opt.defaults["maximize"] else 1.0

    def step(x, y):
        opt.zero_grad()
        loss = sign * torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def warmup(opt):
    """An LR scheduler that changes group["lr"] at every step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1 / (1 + epoch))


def trajectory(config, backend, steps, compile_step=None, compile_model=None, scheduler=None, tensor_lr=False):
    """Snapshots (parameters, every level's rates, weights, effective rates) after each step."""
    model = tiny_model()
    opt = make_optimizer(config, model, backend, tensor_lr)
    sched = scheduler(opt) if scheduler else None
    if compile_model is not None:
        model = torch.compile(model, backend=compile_model)
    step = training_step(model, opt)
    if compile_step is not None:
        step = torch.compile(step, backend=compile_step)
    snaps = []
    for s in range(steps):
        step(*batch(s))
        if sched is not None:
            sched.step()
        snaps.append(opt_snapshot(opt))
    return snaps


def explain_step(opt):
    return torch._dynamo.explain(lambda: opt.step())()


def custom_ops(graphs):
    return {str(n.target).removesuffix(".default") for g in graphs for n in g.graph.nodes
            if "multilevel_hd" in str(n.target)}


# -- one graph ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch"] + (["cpp"] if HAS_CPP else []))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_is_one_graph_without_breaks(config, backend):
    """Dynamo traces step() whole at the first step (state and plan made on the host by
    `_init_group`) and at a later one. The cpp backend's ops appear in the graph."""
    model = tiny_model()
    opt = make_optimizer(config, model, backend)
    for s in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(batch(s)[0]), batch(s)[1]).backward()
        info = explain_step(opt)
        assert (info.graph_count, info.graph_break_count) == (1, 0), [r.reason for r in info.break_reasons]
        if backend == "cpp":
            assert custom_ops(info.graphs) == {"multilevel_hd.reduce", "multilevel_hd.levels", "multilevel_hd.apply"}
    assert int(opt.group_states[0]["step"]) == 2


# -- a compiled training step ---------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiled_training_step_matches_eager_torch_backend(config):
    """forward + backward + step under torch.compile (Inductor), 5 steps from a fresh
    optimizer, the same trajectory as eager. Two graphs: the loss, and step() whole (the
    backward and zero_grad are graph breaks, nothing in step() is). With an LR scheduler
    (Adam) the first change of lr recompiles step() once; after that Dynamo keeps lr
    symbolic and it reaches the graph as a tensor (no recompilation per step)."""
    scheduler = warmup if config == "adam" else None
    eager = trajectory(config, "torch", 5, scheduler=scheduler)
    counter = CompileCounterWithBackend("inductor")
    compiled = trajectory(config, "torch", 5, compile_step=counter, scheduler=scheduler)
    assert counter.frame_count == (3 if scheduler else 2)
    assert_trajectories_close(compiled, eager, TOL_F32, label=f"compiled {config}")


@pytest.mark.parametrize("backend", ["torch"] + (["cpp"] if HAS_CPP else []))
def test_tensor_lr_under_a_scheduler_never_recompiles(backend):
    """lr as a 0-d tensor (torch.optim's advice under torch.compile): the scheduler fills it in
    place and the compiled step reads it as a graph input, so the lr never recompiles step() (a
    float lr recompiles it at its first change, see above) and it matches the eager run with the same
    tensor lr, which matches a float lr."""
    eager = trajectory("adam", backend, 4, scheduler=warmup, tensor_lr=True)
    counter = CompileCounterWithBackend("inductor")
    compiled = trajectory("adam", backend, 4, compile_step=counter, scheduler=warmup, tensor_lr=True)
    # the loss, and step() once (cpp: twice, as without a scheduler: see the README)
    assert counter.frame_count == {"torch": 2, "cpp": 3}[backend]
    assert_trajectories_close(compiled, eager, TOL_F32, label=f"compiled, tensor lr, {backend}")
    assert_trajectories_close(eager, trajectory("adam", backend, 4, scheduler=warmup), TOL_F32,
                              label=f"tensor lr vs float lr, {backend}")


@pytest.mark.skipif(not HAS_CPP, reason="the cpp backend is not available")
def test_compiled_training_step_matches_eager_cpp_backend():
    """The same with the compiled ops, traced through their schemas (Inductor calls them)."""
    eager = trajectory("adam", "cpp", 4)
    counter = CompileCounterWithBackend("inductor")
    compiled = trajectory("adam", "cpp", 4, compile_step=counter)
    assert counter.frame_count >= 2
    assert_trajectories_close(compiled, eager, TOL_F32, label="compiled cpp")


# -- a compiled model, the optimizer outside ------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_model_with_the_optimizer_outside(backend):
    eager = trajectory("adam", backend, 2)
    counter = CompileCounterWithBackend("inductor")
    compiled = trajectory("adam", backend, 2, compile_model=counter)
    assert counter.frame_count == 1
    assert_trajectories_close(compiled, eager, TOL_F32, label=f"compiled model, {backend}")


# -- options changed by hand ---------------------------------------------------------------
def test_changed_options_are_seen_under_compile():
    """Options are resolved on the host and cached; a compiled step still sees every change
    (the second change of a float finds it symbolic to Dynamo, so the cache itself must be
    guarded)."""
    edits = {1: dict(weight_decay=0.1), 2: dict(weight_decay=0.3), 3: dict(hypergrad_lr=0.0)}

    def run(compiled):
        model = tiny_model()
        opt = make_optimizer("adam", model, "torch")
        fn = torch.compile(lambda: opt.step(), backend="eager") if compiled else opt.step
        snaps = []
        for s in range(5):
            opt.param_groups[0].update(edits.get(s, {}))
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(batch(s)[0]), batch(s)[1]).backward()
            fn()
            snaps.append(opt_snapshot(opt))
        return snaps

    assert_trajectories_close(run(True), run(False), TOL_F32, label="edited options")
