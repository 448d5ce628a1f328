"""The byte counts of bench/traffic.py on the cases its docstring works out by hand."""
import pytest
import torch

from bench.traffic import min_bytes

SHAPES = [(10, 3)]  # 30 elements, 10 units, 1 layer
N, UNITS = 30, 10
ADAM = {}
SGDN = {"momentum": 0.9, "nesterov": True}


@pytest.mark.parametrize("family, opts, per_elem", [
    ("adam", ADAM, 28), ("sgd", {}, 12), ("sgd", {"momentum": 0.9}, 20), ("sgd", SGDN, 20),
    ("adam", {"amsgrad": True}, 36),
])
def test_torch_optim(family, opts, per_elem):
    assert min_bytes(family, opts, None, SHAPES, torch.float32) == N * per_elem


@pytest.mark.parametrize("family, opts, levels, per_elem, per_group", [
    # coarse levels: reduction (g, m, v) 12 + step 28; 16 B per unit and for the global rate
    ("adam", ADAM, ("global", "unit"), 40, 16 * (UNITS + 1)),
    # param level in a multi-level config: + rate read in the reduction, read + written in the step
    ("adam", ADAM, ("global", "layer", "param"), 52, 16 * 2),
    ("sgd", SGDN, ("global", "unit"), 32, 16 * (UNITS + 1)),
    ("sgd", {"momentum": 0.9}, ("global",), 28, 16),
    ("sgd", {}, ("global",), 24, 16),
    # multiplicative rule: Qg and Qu travel with S
    ("adam", {"hypergrad_rule": "multiplicative"}, ("unit",), 40, 32 * UNITS),
    # coupled weight decay: the reduction also reads p
    ("adam", {"weight_decay": 1e-4}, ("global",), 44, 16),
    ("adam", {"weight_decay": 1e-2, "decoupled_weight_decay": True}, ("global",), 40, 16),
    # amsgrad: the reduction reads g, m, vmax; the step moves vmax too
    ("adam", {"amsgrad": True}, ("global", "unit"), 48, 16 * (UNITS + 1)),
])
def test_multilevel(family, opts, levels, per_elem, per_group):
    assert min_bytes(family, opts, levels, SHAPES, torch.float32) == N * per_elem + per_group


def test_param_level_alone_has_no_sums():
    # Only the non-finite flag needs a pass before the step: 4 + 28 + 8 (param rate)
    assert min_bytes("adam", ADAM, ("param",), SHAPES, torch.float32) == N * 40
    # SGD without momentum also reads the stored u_prev in the step pass for h
    assert min_bytes("sgd", {}, ("param",), SHAPES, torch.float32) == N * (4 + 16 + 8 + 4)


def test_dtypes():
    # bf16 parameters keep float32 rates and sums; float64 parameters get float64 ones
    assert min_bytes("adam", ADAM, ("global",), SHAPES, torch.bfloat16) == N * 20 + 16
    assert min_bytes("adam", ADAM, ("global",), SHAPES, torch.float64) == N * 80 + 32
