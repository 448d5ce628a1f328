"""What the optimizer remembers, in one layout that every backend reads and writes.

Per parameter (`optimizer.state[p]`, created at the parameter's first step with a gradient):
  "step"            float32 0-d: the parameter's own step count (as torch.optim keeps it)
  "exp_avg", "exp_avg_sq"   Adam moments
  "momentum_buffer"         SGD with momentum
  "prev_direction"          SGD when u_prev cannot be recomputed (no momentum, or Nesterov)
  "param_rate"              the param level's rates, shaped like p
Per param group (`optimizer.group_states[i]`, created at the group's first step):
  "step"            0-d: t, the group's steps taken
  "skipped"         int64 0-d: steps skipped by the non-finite guard
  "weights"         [K]: the combination weights the next step uses
  "last_weights"    [K]: the weights the last step applied (for effective_rate)
  "rate_global"     0-d; "rate_layer" [tensors in the group]; "rate_unit" [units in the group]
Rates and state are float32 (float64 for float64 parameters; the group-level tensors are
float64 when any parameter of the group is), on the parameters' device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hierarchy import GroupLayout, StepPlan
from .options import GroupOptions

GROUP_RATE_KEYS = {"global": "rate_global", "layer": "rate_layer", "unit": "rate_unit"}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rates, state and math: float64 for float64 tensors, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_dtype(params) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def new_group_state(opts: GroupOptions, layout: GroupLayout, device, dtype) -> dict:
    weights = torch.tensor(opts.init_weights, dtype=dtype, device=device)
    state = {
        "step": torch.zeros((), dtype=dtype, device=device),
        "skipped": torch.zeros((), dtype=torch.int64, device=device),
        "weights": weights,
        "last_weights": weights.clone(),
    }
    sizes = {"global": (), "layer": (layout.num_layers,), "unit": (layout.num_units,)}
    for level, key in GROUP_RATE_KEYS.items():
        if level in opts.levels:
            state[key] = torch.full(sizes[level], opts.lr, dtype=dtype, device=device)
    return state


def new_param_state(p: torch.Tensor, opts: GroupOptions) -> dict:
    dtype = compute_dtype(p.dtype)

    def zeros():
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
    if opts.kind == "adam":
        state["exp_avg"], state["exp_avg_sq"] = zeros(), zeros()
    else:
        if opts.momentum != 0:
            state["momentum_buffer"] = zeros()
        if opts.stores_direction:
            state["prev_direction"] = zeros()
    if "param" in opts.levels:
        state["param_rate"] = zeros().fill_(opts.lr)
    return state


def expected_param_keys(opts: GroupOptions) -> set[str]:
    return set(new_param_state(torch.zeros(()), opts))


@dataclass
class GroupJob:
    """One param group's step, as the optimizer hands it to a backend.

    `params`, `grads` and `states` list the parameters that step (gradient present, at
    least one element), in group order; `plan.active[i]` is the group index of params[i].
    """

    opts: GroupOptions
    plan: StepPlan
    params: list
    grads: list
    states: list
    group_state: dict
