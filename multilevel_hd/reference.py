"""docs/algorithm.md section 2, written plainly: the oracle every other backend is tested against.

Per-tensor Python loops, host-side branching and `float()` reads are fine here: this
backend is about being obviously right, in any dtype including float64, not about speed.
Each level's rates are handled as one tensor per parameter that broadcasts against the
parameter (global and layer: 0-d; unit: shaped (n0, 1, ..., 1); param: shaped like p),
so "the rate element e uses" is plain broadcasting.
"""
from __future__ import annotations

import math

import torch

from .hierarchy import TensorLayout, tensor_units, unit_shape, unit_view
from .options import MAX_UNNORMALISED_WEIGHT, GroupOptions
from .state import GroupJob, compute_dtype, record_applied_rates

name = "reference"


def rate_view(level: str, group_state: dict, t: TensorLayout, p, param_state) -> torch.Tensor:
    """The current rates of `level` for parameter p, broadcastable against p."""
    if level == "global":
        return group_state["rate_global"]
    if level == "layer":
        return group_state["rate_layer"][t.layer]
    if level == "unit":
        return unit_view(group_state["rate_unit"], t, p)
    return param_state["param_rate"]


def combined_rate(opts: GroupOptions, weights, group_state, t: TensorLayout, p, param_state, step):
    """kappa of docs/algorithm.md step 6, times the LR scheduler's factor (README: LR schedulers):
    lr_scale * (tau_t * sum_k w_k alpha_k[idx_k(e)] + (1 - tau_t) * final_lr)."""
    dtype = compute_dtype(p.dtype)
    alpha = sum(
        weights[k].to(dtype) * rate_view(level, group_state, t, p, param_state).to(dtype)
        for k, level in enumerate(opts.levels)
    )
    tau_t = math.exp(-opts.hd_decay * step)
    return opts.lr_scale * (tau_t * alpha + (1 - tau_t) * opts.final_lr)


def applied_rate(opts: GroupOptions, group_state, t: TensorLayout, p, param_state) -> torch.Tensor:
    """kappa as the last step of p applied it (see state.record_applied_rates)."""
    dtype = compute_dtype(p.dtype)
    kappa = group_state["applied_offset"][t.layer].to(dtype)
    for k, level in enumerate(opts.levels):
        if level != "global":
            rate = rate_view(level, group_state, t, p, param_state).to(dtype)
            kappa = kappa + group_state["applied_scale"][t.layer, k].to(dtype) * rate
    return kappa


def step(job: GroupJob) -> None:
    opts, gs = job.opts, job.group_state
    if job.sharding_group is not None:
        raise RuntimeError("the reference backend does not run sharded param groups; use another backend")
    grads = [_effective_grad(p, g, opts, job.grad_scale) for p, g in zip(job.params, job.grads)]
    found_inf = job.found_inf is not None and float(job.found_inf) > 0
    if found_inf or (opts.skip_nonfinite and not all(bool(torch.isfinite(g).all()) for g in grads)):
        gs["skipped"] += 1
        return
    gs["step"] += 1
    t = float(gs["step"])
    weights_used = gs["weights"].clone()
    if t >= 2:
        _update_levels(job, grads, t)
    layouts = job.plan.active_layouts
    for p, g, st, lay in zip(job.params, grads, job.states, layouts):
        u = _advance_direction(g, st, opts)
        kappa = combined_rate(opts, weights_used, gs, lay, p, st, t)
        new_p = p.to(g.dtype)
        if opts.decoupled_weight_decay:
            new_p = new_p * (1 - kappa * opts.weight_decay)
        p.copy_(new_p - kappa * u)
    gs["lr_scale"].fill_(opts.lr_scale)
    stepped = torch.zeros(job.plan.layout.num_layers, dtype=torch.bool, device=gs["step"].device)
    stepped[[lay.layer for lay in layouts]] = True
    record_applied_rates(opts, gs, stepped, torch.tensor(math.exp(-opts.hd_decay * t), dtype=gs["step"].dtype), weights_used)


def _effective_grad(p, grad, opts: GroupOptions, grad_scale) -> torch.Tensor:
    g = grad.to(compute_dtype(p.dtype))
    if grad_scale is not None:  # GradScaler's: grad = grad_scale * the true gradient
        g = g / grad_scale.to(g)
    if opts.maximize:
        g = -g
    if opts.weight_decay > 0 and not opts.decoupled_weight_decay:
        g = g + opts.weight_decay * p.to(g.dtype)
    return g


def _adam_direction(m, v, step: float, opts: GroupOptions) -> torch.Tensor:
    step = max(step, 1.0)  # a parameter that never stepped has m = v = 0, so u = 0
    m_hat = m / (1 - opts.beta1**step)
    v_hat = v / (1 - opts.beta2**step)
    return torch.where(m == 0, m_hat, m_hat / (torch.sqrt(v_hat) + opts.eps))  # (not 0/0 with eps = 0)


def _second_moment(st: dict, opts: GroupOptions) -> torch.Tensor:
    """What Adam's u divides by: v, or with amsgrad its running maximum vmax."""
    return st["max_exp_avg_sq"] if opts.amsgrad else st["exp_avg_sq"]


def _previous_direction(st: dict, opts: GroupOptions) -> torch.Tensor:
    """u_prev: the base direction of the parameter's most recent step (0 if none)."""
    if opts.kind == "adam":
        return _adam_direction(st["exp_avg"], _second_moment(st, opts), float(st["step"]), opts)
    if opts.stores_direction:
        return st["prev_direction"]
    return st["momentum_buffer"]


def _advance_direction(g, st: dict, opts: GroupOptions) -> torch.Tensor:
    """Base direction u of this step (docs/algorithm.md section 3); updates the base state."""
    st["step"] += 1
    step = float(st["step"])
    if opts.kind == "adam":
        st["exp_avg"].mul_(opts.beta1).add_(g, alpha=1 - opts.beta1)
        st["exp_avg_sq"].mul_(opts.beta2).addcmul_(g, g, value=1 - opts.beta2)
        if opts.amsgrad:  # the maximum of the raw v, before bias correction (torch.optim.Adam)
            torch.maximum(st["max_exp_avg_sq"], st["exp_avg_sq"], out=st["max_exp_avg_sq"])
        return _adam_direction(st["exp_avg"], _second_moment(st, opts), step, opts)
    u = g
    if opts.momentum != 0:
        buf = st["momentum_buffer"]
        if step == 1:
            buf.copy_(g)
        else:
            buf.mul_(opts.momentum).add_(g, alpha=1 - opts.dampening)
        u = g + opts.momentum * buf if opts.nesterov else buf.clone()
    if opts.stores_direction:
        st["prev_direction"].copy_(u)
    return u


def _level_sums(level: str, xs: list, acc_dtype) -> list:
    """S_k per parameter, in the broadcastable per-parameter form of `rate_view`."""
    if level == "global":
        total = sum(x.sum(dtype=acc_dtype) for x in xs)
        return [total] * len(xs)
    if level == "layer":
        return [x.sum(dtype=acc_dtype) for x in xs]
    if level == "unit":
        return [x.reshape(tensor_units(x), -1).sum(1, dtype=acc_dtype).reshape(unit_shape(x)) for x in xs]
    return list(xs)


def _level_total(level: str, per_param: list) -> torch.Tensor:
    """Sum over the distinct groups j of a level (the global entry is shared by all)."""
    if level == "global":
        return per_param[0].sum()
    return sum(x.sum() for x in per_param)


def _group_size(level: str, lay: TensorLayout, n: int) -> int:
    return {"global": n, "layer": lay.numel, "unit": lay.row_len, "param": 1}[level]


def _update_levels(job: GroupJob, grads: list, t: float) -> None:
    """docs/algorithm.md step 3-4: hyper-gradient sums, new rates and new weights."""
    opts, gs = job.opts, job.group_state
    acc = gs["weights"].dtype
    layouts = job.plan.active_layouts
    n = job.plan.num_elements
    u_prev = [_previous_direction(st, opts) for st in job.states]
    h = [g * u for g, u in zip(grads, u_prev)]
    # d kappa_{t-1} / d alpha_k = lr_scale_{t-1} * tau_{t-1} * w_k
    hd_prev = float(gs["lr_scale"]) * math.exp(-opts.hd_decay * (t - 1))
    w = gs["weights"]
    old = {
        level: [rate_view(level, gs, lay, p, st).clone() for p, lay, st in zip(job.params, layouts, job.states)]
        for level in opts.levels
    }

    hd = {}  # the HD-updated, unshrunk rates
    sums = {}
    for k, level in enumerate(opts.levels):
        beta = opts.hypergrad_lr[level]
        sums[level] = s = _level_sums(level, h, acc)
        if opts.rule == "additive":
            b = [beta * n / _group_size(level, lay, n) if opts.scaling == "size" else beta for lay in layouts]
            hd[level] = [a + bj * hd_prev * w[k] * sj for a, bj, sj in zip(old[level], b, s)]
        else:
            if level == "param":
                cos = [torch.sign(x) for x in h]
            else:
                qg = _level_sums(level, [g * g for g in grads], acc)
                qu = _level_sums(level, [u * u for u in u_prev], acc)
                cos = [torch.where(a * b > 0, sj / torch.sqrt(a * b), 0.0) for sj, a, b in zip(s, qg, qu)]
            hd[level] = [a * (1 + beta * w[k] * c) for a, c in zip(old[level], cos)]

    new = dict(hd)
    for level, rho in opts.shrinkage.items():
        parent = opts.parents[level]
        new[level] = [(1 - rho) * a + rho * pa for a, pa in zip(hd[level], hd[parent])]
    if opts.rate_bounds is not None and opts.rate_bounds != (None, None):
        lo, hi = opts.rate_bounds
        new = {level: [torch.clamp(a, min=lo, max=hi) for a in rs] for level, rs in new.items()}

    if opts.multi_level:
        gs["weights"].copy_(_new_weights(opts, w.clone(), old, sums, grads, u_prev, hd_prev))

    for level in opts.levels:
        for rate, p, lay, st in zip(new[level], job.params, layouts, job.states):
            if level == "global":
                gs["rate_global"].copy_(rate)
            elif level == "layer":
                gs["rate_layer"][lay.layer] = rate
            elif level == "unit":
                gs["rate_unit"][lay.unit_offset : lay.unit_offset + lay.units] = rate.reshape(-1)
            else:
                st["param_rate"].copy_(rate)


def _new_weights(opts, w, old, sums, grads, u_prev, hd_prev) -> torch.Tensor:
    levels = opts.levels
    # sum_j alpha_k_old[j] * S_k[j], per level: G_k / tau_{t-1}
    a_dot_s = torch.stack([_level_total(lv, [a * s for a, s in zip(old[lv], sums[lv])]) for lv in levels]).to(w.dtype)
    if opts.rule == "additive":
        w = w + opts.combination_lr * hd_prev * a_dot_s
    else:
        r = torch.stack([sum(((a * g) ** 2).sum() for a, g in zip(old[lv], grads)) for lv in levels]).to(w.dtype)
        u_sq = sum((u * u).sum() for u in u_prev).to(w.dtype)
        denom = torch.sqrt(r * u_sq)
        w = w * torch.where(denom > 0, 1 + opts.combination_lr * a_dot_s / denom, 1.0)
    w = torch.clamp(w, min=0, max=MAX_UNNORMALISED_WEIGHT)  # (a sum that cannot overflow)
    total = w.sum()
    return w / total if total > 0 else torch.full_like(w, 1 / len(levels))


def unavailable_reason(device):
    return None  # plain torch operations run on every device
