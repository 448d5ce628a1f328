"""CUDA graphs (README, "CUDA graphs"): after warm-up steps, `opt.step()` can be captured in
a CUDA graph and replayed; every replay equals an eager step on the same gradients.

A step never reads a device value on the host and, once the warm-up steps have built
the plan, the launch tables and the scratch buffers, allocates nothing the graph cannot
own, so capture needs no special mode. The gradients must live in static tensors (the
graph replays on fixed addresses), and host-side options (lr, an LR scheduler's factor)
are frozen into the graph at capture, as for torch.optim's capturable optimizers.

Runs on the GPU only (`bash bench/gpu_check.sh`, MLHD_TEST_DEVICE=cuda).
"""
from __future__ import annotations

import pytest
import torch

import multilevel_hd as mlhd
from conftest import DEVICE, FAST_BACKENDS
from trajectory import GradFn, make_params

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device (MLHD_TEST_DEVICE=cuda)")

WARMUP, REPLAYS = 3, 5
CASES = {
    "adam-all-levels": (mlhd.MultiLevelAdam, dict(lr=0.01, hypergrad_rule="additive", hypergrad_lr=3e-6,
                                                  levels=("global", "layer", "unit", "param"))),
    "sgd-nesterov-default-levels": (mlhd.MultiLevelSGD, dict(lr=0.05, hypergrad_rule="additive", hypergrad_lr=1e-5, momentum=0.9,
                                                             nesterov=True)),
}


def _state(opt) -> list:
    out = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    for r in opt.rates():
        out += [r["weights"]] + [x for level, v in r.items() if level != "weights"
                                 for x in (v if isinstance(v, list) else [v])]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_captured_step_replays_like_eager_steps(backend, case, dtype):
    cls, kwargs = CASES[case]
    gradfn = GradFn()
    graphed_params = make_params(dtype, DEVICE)
    eager_params = make_params(dtype, DEVICE)
    graphed = cls(graphed_params, backend=backend, **kwargs)
    eager = cls(eager_params, backend=backend, **kwargs)
    static_grads = [torch.zeros_like(p) for p in graphed_params]
    for p, g in zip(graphed_params, static_grads):
        p.grad = g

    def load_grads(step):
        for i, (p, q, g) in enumerate(zip(graphed_params, eager_params, static_grads)):
            g.copy_(gradfn.grad(step, i, p))
            q.grad = gradfn.grad(step, i, q)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for step in range(WARMUP):
            load_grads(step)
            graphed.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    before = _state(graphed)
    with torch.cuda.graph(graph):
        graphed.step()
    # capturing records the kernels without running them
    assert all(torch.equal(a, b) for a, b in zip(before, _state(graphed)))

    for step in range(WARMUP, WARMUP + REPLAYS):
        load_grads(step)
        graph.replay()
        eager.step()
        for i, (a, b) in enumerate(zip(_state(graphed), _state(eager), strict=True)):
            assert torch.equal(a, b), f"{backend} {case}: replay {step - WARMUP}, tensor {i} differs from eager"
    num_params = len(graphed_params)  # the rates and weights moved across the replays:
    assert any(not torch.equal(a, b) for a, b in zip(before[num_params:], _state(graphed)[num_params:]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_captured_step_skips_a_nonfinite_gradient_on_the_device(backend):
    """The non-finite guard decides on the device, so it works inside a replay too."""
    cls, kwargs = CASES["adam-all-levels"]
    params = make_params(torch.float32, DEVICE)
    opt = cls(params, backend=backend, **kwargs)
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    gradfn = GradFn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP):
            for i, (p, g) in enumerate(zip(params, grads)):
                g.copy_(gradfn.grad(step, i, p))
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    grads[0].view(-1)[0] = float("nan")
    before = _state(opt)
    graph.replay()
    assert all(torch.equal(a, b) for a, b in zip(before, _state(opt)))
    assert opt.skipped_steps() == [1]
