"""The torch backend's step dispatches as many ATen operations for 40 tensors as for 4
(docs/algorithm.md's math as torch._foreach_* operations over all tensors and single
operations over flat buffers), where torch.optim.Adam(foreach=True) itself grows (one host
read of the step count per tensor). Counted on the CPU with a dispatch mode; the whole file
takes about 2 s."""
import pytest
import torch

import multilevel_hd as mlhd
from bench.launches import count_dispatched_ops

CONFIGS = {
    "adam": lambda ps: mlhd.MultiLevelAdam(ps, backend="torch"),
    "adamw-additive-amsgrad": lambda ps: mlhd.MultiLevelAdamW(ps, amsgrad=True, hypergrad_rule="additive",
                                                              levels=("global", "layer", "unit"), backend="torch"),
    "sgdn": lambda ps: mlhd.MultiLevelSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, backend="torch"),
    "sgd-maximize": lambda ps: mlhd.MultiLevelSGD(ps, lr=0.1, maximize=True, backend="torch"),
    "adam-global-layer-param": lambda ps: mlhd.MultiLevelAdam(ps, levels=("global", "layer", "param"), backend="torch"),
    "adamw-multiplicative-unit-param-shrinkage": lambda ps: mlhd.MultiLevelAdamW(
        ps, levels=("unit", "param"), hypergrad_rule="multiplicative", shrinkage={"param": 0.1}, backend="torch"),
    "sgdn-param-additive-bounded": lambda ps: mlhd.MultiLevelSGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, levels=("param",), hypergrad_rule="additive", rate_bounds=(0.0, 1.0),
        backend="torch"),
    "sgd-global-param-shrinkage": lambda ps: mlhd.MultiLevelSGD(ps, lr=0.1, levels=("global", "param"),
                                                                shrinkage={"param": 0.2}, backend="torch"),
}


def _ops_per_step(make, tensors: int) -> int:
    params = [torch.randn(8, 3, requires_grad=True) for _ in range(tensors)] + [torch.randn(5, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    for _ in range(2):  # state, plan and buffers are made at the first steps
        opt.step()
    return sum(count_dispatched_ops(opt.step).values())


@pytest.mark.parametrize("config", CONFIGS)
def test_ops_per_step_do_not_grow_with_tensors(config):
    assert _ops_per_step(CONFIGS[config], 40) == _ops_per_step(CONFIGS[config], 4)


def test_counter_sees_per_tensor_operations():
    """The check above can fail: foreach Adam's per-tensor host reads are counted."""
    def adam(ps):
        return torch.optim.Adam(ps, foreach=True)
    assert _ops_per_step(adam, 40) > _ops_per_step(adam, 4)
