"""What the optimizer remembers, in one layout that every backend reads and writes.

Per parameter (`optimizer.state[p]`, created at the parameter's first step with a gradient):
  "step"            float32 0-d: the parameter's own step count (as torch.optim keeps it)
  "exp_avg", "exp_avg_sq"   Adam moments
  "max_exp_avg_sq"          Adam with amsgrad: the running maximum of exp_avg_sq
  "momentum_buffer"         SGD with momentum
  "prev_direction"          SGD when u_prev cannot be recomputed (no momentum, or Nesterov)
  "param_rate"              the param level's rates, shaped like p
Per param group (`optimizer.group_states[i]`, created at the group's first step):
  "step"            0-d: t, the group's steps taken
  "skipped"         int64 0-d: steps skipped (a NaN/Inf gradient, or GradScaler's found_inf)
  "lr_scale"        0-d: the LR scheduler's factor lr / initial_lr that the last step applied
                    (the next hyper-gradient goes through it: README, LR schedulers)
  "weights"         [K]: the combination weights the next step uses
  "applied_scale"   [tensors, K], "applied_offset" [tensors]: what each tensor's own last
                    step applied, for effective_rate (see `record_applied_rates`)
  "rate_global"     0-d; "rate_layer" [tensors in the group]; "rate_unit" [units in the group]
Rates and state are float32 (float64 for float64 parameters; the group-level tensors are
float64 when any parameter of the group is), on the parameters' device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .hierarchy import GroupLayout, StepPlan
from .options import GroupOptions, is_one

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
        "lr_scale": torch.ones((), dtype=dtype, device=device),
        "weights": weights,
    }
    for level, key in GROUP_RATE_KEYS.items():
        if level in opts.levels:
            state[key] = torch.full(group_state_shapes(opts, layout)[key], opts.lr, dtype=dtype, device=device)
    # Before any step effective_rate reports the rate the first step would apply: lr.
    state["applied_scale"] = weights.expand(layout.num_layers, -1).clone()
    state["applied_offset"] = torch.zeros(layout.num_layers, dtype=dtype, device=device)
    if "global" in opts.levels:
        state["applied_offset"] += weights[opts.levels.index("global")] * opts.lr
    return state


def group_state_shapes(opts: GroupOptions, layout: GroupLayout) -> dict:
    """The shape of every group-state tensor (what a loaded state dict must match)."""
    shapes = {
        "step": (), "skipped": (), "lr_scale": (), "weights": (len(opts.levels),),
        "applied_scale": (layout.num_layers, len(opts.levels)), "applied_offset": (layout.num_layers,),
    }
    sizes = {"global": (), "layer": (layout.num_layers,), "unit": (layout.num_units,)}
    for level, key in GROUP_RATE_KEYS.items():
        if level in opts.levels:
            shapes[key] = sizes[level]
    return shapes


def record_applied_rates(opts: GroupOptions, gs: dict, stepped, tau_t, weights_used) -> None:
    """Remember, for each tensor that stepped, the parts of kappa that later steps change.

    A tensor's layer, unit and param rates move only when it steps, but the global rate
    and the weights move at every step of its group. So the kappa its last step applied is
    `applied_offset[i] + sum over non-global levels k of applied_scale[i, k] * alpha_k`,
    where the offset holds (1 - tau) * final_lr plus the global term, all times the LR
    scheduler's factor. `stepped` is a [tensors] bool device tensor, or a 0-d one when every
    tensor of the group steps together; nothing is read on the host. `tau_t` is a 0-d tensor,
    or the Python number 1 (hd_decay = 0), with which the factors that are 1 and the terms
    that are 0 cost no operation.
    """
    factor = opts.lr_scale * tau_t
    scale = weights_used if is_one(factor) else factor * weights_used
    offset = None if is_one(tau_t) else opts.lr_scale * (1 - tau_t) * opts.final_lr
    if "global" in opts.levels:
        global_term = scale[opts.levels.index("global")] * gs["rate_global"]
        offset = global_term if offset is None else offset + global_term
    torch.where(stepped[..., None], scale, gs["applied_scale"], out=gs["applied_scale"])
    if offset is None:
        gs["applied_offset"].masked_fill_(stepped, 0.0)
    else:
        torch.where(stepped, offset, gs["applied_offset"], out=gs["applied_offset"])


def new_param_state(p: torch.Tensor, opts: GroupOptions) -> dict:
    dtype = compute_dtype(p.dtype)

    def zeros():
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
    if opts.kind == "adam":
        state["exp_avg"], state["exp_avg_sq"] = zeros(), zeros()
        if opts.amsgrad:
            state["max_exp_avg_sq"] = zeros()
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
    `grad_scale` and `found_inf` come from torch.amp.GradScaler (0-d device tensors): the
    grads are `grad_scale` times the true ones, and `found_inf > 0` skips the step.
    `sharding_group`: the process group whose ranks hold the other parts of this param
    group; the level stage all-reduces the sums that span tensors over it. `shards_rows`:
    those parts are rows of the same tensors (FSDP2), so the layers' sums span the ranks too.
    """

    opts: GroupOptions
    plan: StepPlan
    params: list
    grads: list
    states: list
    group_state: dict
    grad_scale: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None
    sharding_group: Any = None
    shards_rows: bool = False
    _grad_factors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def grad_factor(self, dtype) -> torch.Tensor:
        """What the raw gradient is multiplied by before anything else: -1 for `maximize`,
        over the GradScaler's scale. A 0-d device tensor, so kernels read it from memory;
        made once per step and dtype, however many passes and tensors ask for it."""
        if dtype not in self._grad_factors:
            sign = -1.0 if self.opts.maximize else 1.0
            device = self.group_state["weights"].device
            if self.grad_scale is None:
                factor = sign_tensor(self.plan, sign, device, dtype)
            else:
                factor = (sign / self.grad_scale.to(device=device, dtype=torch.float64)).to(dtype)
            self._grad_factors[dtype] = factor
        return self._grad_factors[dtype]


def sign_tensor(plan: StepPlan, sign: float, device, dtype) -> torch.Tensor:
    """`sign` as a 0-d device tensor, made once per plan (the optimizer makes the one that
    `maximize` needs before a step, so that a torch.compile'd step does not create it)."""
    return plan.cached(("grad_factor", device, dtype, sign), lambda: torch.tensor(sign, dtype=dtype, device=device))
