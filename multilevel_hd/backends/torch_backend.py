"""The pure-PyTorch backend: SPEC section 2 with foreach and batched operations.

The baseline the fused kernels are measured against, and the fallback where nothing
compiled runs. Nothing in `step` reads a tensor value on the host: the non-finite guard
and "t >= 2" are 0/1 device tensors that gate every update (a rate or state update
becomes `lerp(old, new, gate)`, the parameter update is scaled by the gate), so a skipped
step leaves every tensor as it was without a host synchronisation.

Level sums go through the group's flat unit array: one row sum per tensor writes S_unit
(and the squared sums the multiplicative rule needs), and the layer and global sums are
segment sums of that small array. Half-precision parameters are updated through float32
copies, with float32 state and math.
"""
from __future__ import annotations

import torch

from ..hierarchy import StepPlan
from ..options import GroupOptions
from ..state import GroupJob, compute_dtype

name = "torch"
_COARSE = ("global", "layer", "unit")


def unavailable_reason(device):
    return None


def _unit_shape(p):
    return (p.shape[0],) + (1,) * (p.dim() - 1) if p.dim() else ()


def _unit_sums(xs, plan: StepPlan, flat_dtype, device) -> torch.Tensor:
    """Row sums of each tensor of `xs` into the group's flat unit array (zeros elsewhere)."""
    out = torch.zeros(plan.layout.num_units, dtype=flat_dtype, device=device)
    for x, lay in zip(xs, plan.active_layouts):
        rows = out[lay.unit_offset : lay.unit_offset + lay.units]
        if x.dim() >= 2:
            torch.sum(x, dim=tuple(range(1, x.dim())), dtype=flat_dtype, out=rows)
        else:
            rows.copy_(x.reshape(-1))
    return out


class _LevelSums:
    """S, Qg, Qu of a coarse level from the unit sums (Q only for the multiplicative rule)."""

    def __init__(self, plan: StepPlan, device, s_unit, qg_unit, qu_unit):
        self.unit = (s_unit, qg_unit, qu_unit)
        lengths = plan.units_per_layer(device)
        self.layer = tuple(
            None if x is None else torch.segment_reduce(x, "sum", lengths=lengths) for x in self.unit
        )
        self.global_ = tuple(None if x is None else x.sum() for x in self.unit)

    def of(self, level):
        return {"global": self.global_, "layer": self.layer, "unit": self.unit}[level]


def step(job: GroupJob) -> None:
    opts, plan, gs = job.opts, job.plan, job.group_state
    device, acc = gs["weights"].device, gs["weights"].dtype
    params = [p if p.dtype == compute_dtype(p.dtype) else p.float() for p in job.params]
    grads = [g.to(compute_dtype(g.dtype)) for g in job.grads]
    if opts.maximize:
        grads = torch._foreach_neg(grads)
    if opts.weight_decay > 0 and not opts.decoupled_weight_decay:
        grads = torch._foreach_add(grads, params, alpha=opts.weight_decay)

    # The guard: ok is a device flag; non-finite gradients are zeroed so that the gated
    # arithmetic below stays finite (a NaN times a zero gate would still be NaN).
    if opts.skip_nonfinite:
        ok = torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
        grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
        gs["skipped"].add_((~ok).to(torch.int64))
        gate = ok.to(acc)
    else:
        gate = torch.ones((), dtype=acc, device=device)
    gs["step"].add_(gate)
    t = gs["step"]
    hd_gate = gate * (t >= 2)
    tau_prev = torch.exp(-opts.hd_decay * (t - 1))
    weights_used = gs["weights"].clone()

    _update_levels(job, grads, _previous_directions(job), hd_gate, tau_prev)
    directions = _advance_directions(job, grads, gate)

    tau_t = torch.exp(-opts.hd_decay * t)
    kappas = _applied_rates(job, weights_used, tau_t, gate)
    if opts.decoupled_weight_decay and opts.weight_decay > 0:
        decay = [1 - kappa * opts.weight_decay for kappa in kappas]
        torch._foreach_mul_(params, decay)
    torch._foreach_addcmul_(params, directions, kappas, value=-1)
    for p, p_math in zip(job.params, params):
        if p is not p_math:
            p.copy_(p_math)
    gs["last_weights"].lerp_(weights_used, gate)


def _adam_bias_corrections(steps, opts: GroupOptions, like):
    """1 - beta^max(step, 1) per tensor (a never-stepped parameter has zero moments)."""
    steps = [s.to(x.dtype).clamp(min=1) for s, x in zip(steps, like)]
    bc1 = torch._foreach_sub(torch._foreach_pow(opts.beta1, steps), 1)
    bc2 = torch._foreach_sub(torch._foreach_pow(opts.beta2, steps), 1)
    return torch._foreach_neg(bc1), torch._foreach_neg(bc2)


def _adam_directions(job: GroupJob):
    opts = job.opts
    exp_avgs = [st["exp_avg"] for st in job.states]
    bc1, bc2 = _adam_bias_corrections([st["step"] for st in job.states], opts, exp_avgs)
    denom = torch._foreach_div([st["exp_avg_sq"] for st in job.states], bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, opts.eps)
    u = torch._foreach_div(exp_avgs, bc1)
    torch._foreach_div_(u, denom)
    return u


def _previous_directions(job: GroupJob):
    if job.opts.kind == "adam":
        return _adam_directions(job)
    key = "prev_direction" if job.opts.stores_direction else "momentum_buffer"
    return [st[key] for st in job.states]


def _advance_directions(job: GroupJob, grads, gate):
    """This step's base directions; base state and step counts move only where gate is 1."""
    opts, states = job.opts, job.states
    steps = [st["step"] for st in states]
    if opts.kind == "adam":
        g_gate = gate.to(grads[0].dtype)
        torch._foreach_lerp_([st["exp_avg"] for st in states], grads, (1 - opts.beta1) * g_gate)
        torch._foreach_lerp_([st["exp_avg_sq"] for st in states], torch._foreach_mul(grads, grads), (1 - opts.beta2) * g_gate)
        torch._foreach_add_(steps, gate.float())
        return _adam_directions(job)
    directions = grads
    if opts.momentum != 0:
        bufs = [st["momentum_buffer"] for st in states]
        # The first step sets buf = g: buf is still zero then, so only g's factor changes.
        g_gate = gate.to(bufs[0].dtype)
        g_factor = [(1 - opts.dampening * (s != 0).to(g_gate.dtype)) * g_gate for s in steps]
        torch._foreach_mul_(bufs, 1 - (1 - opts.momentum) * g_gate)
        torch._foreach_addcmul_(bufs, grads, g_factor)
        directions = torch._foreach_add(grads, bufs, alpha=opts.momentum) if opts.nesterov else bufs
    if opts.stores_direction:
        torch._foreach_lerp_([st["prev_direction"] for st in states], directions, gate.to(grads[0].dtype))
    torch._foreach_add_(steps, gate.float())
    return directions


def _coarse_rates(opts: GroupOptions, gs: dict, level: str):
    return gs[{"global": "rate_global", "layer": "rate_layer", "unit": "rate_unit"}[level]]


def _broadcast_to_units(level, values, plan: StepPlan, device):
    """A coarse level's per-j values as one entry per unit of the flat unit array."""
    if level == "layer":
        return values[plan.layer_of_unit(device)]
    return values  # global broadcasts as a 0-d tensor; unit is already per unit


def _per_tensor(flat_units, plan: StepPlan, params):
    """Views of a per-unit array shaped to broadcast against each parameter."""
    return [
        flat_units[lay.unit_offset : lay.unit_offset + lay.units].view(_unit_shape(p))
        for p, lay in zip(params, plan.active_layouts)
    ]


def _update_levels(job: GroupJob, grads, u_prev, hd_gate, tau_prev) -> None:
    """SPEC steps 3-4 for every active level; every update is gated by hd_gate."""
    opts, plan, gs = job.opts, job.plan, job.group_state
    device, acc = gs["weights"].device, gs["weights"].dtype
    n = plan.num_elements
    multiplicative = opts.rule == "multiplicative"
    w = gs["weights"]
    h = torch._foreach_mul(grads, u_prev)
    sq_g = torch._foreach_mul(grads, grads) if multiplicative else None
    sq_u = torch._foreach_mul(u_prev, u_prev) if multiplicative else None
    coarse = [lv for lv in opts.levels if lv in _COARSE]
    sums = None
    if coarse or (multiplicative and opts.multi_level):
        sums = _LevelSums(
            plan, device, _unit_sums(h, plan, acc, device),
            _unit_sums(sq_g, plan, acc, device) if multiplicative else None,
            _unit_sums(sq_u, plan, acc, device) if multiplicative else None,
        )

    hd = {}  # HD-updated, unshrunk rates: flat tensors for coarse levels, lists for param
    for level in coarse:
        k, beta = opts.levels.index(level), opts.hypergrad_lr[level]
        old = _coarse_rates(opts, gs, level)
        s, qg, qu = sums.of(level)
        if multiplicative:
            prod = qg * qu
            cos = torch.where(prod > 0, s / prod.sqrt(), 0.0)
            hd[level] = old * (1 + beta * w[k] * cos)
        else:
            sized = opts.scaling == "size" and level != "global"  # global: N / N = 1
            scale = plan.size_scale(level, device, acc) if sized else 1.0
            hd[level] = old + (beta * tau_prev * w[k]) * scale * s
    if "param" in opts.levels:
        k, beta = opts.levels.index("param"), opts.hypergrad_lr["param"]
        old_param = [st["param_rate"] for st in job.states]
        if multiplicative:
            factor = torch._foreach_mul(torch._foreach_sign(h), (beta * w[k]).to(old_param[0].dtype))
            torch._foreach_add_(factor, 1)
            hd["param"] = torch._foreach_mul(old_param, factor)
        else:
            coef = beta * (n if opts.scaling == "size" else 1) * tau_prev * w[k]
            hd["param"] = torch._foreach_add(old_param, torch._foreach_mul(h, coef.to(old_param[0].dtype)))

    new = dict(hd)
    for level, rho in opts.shrinkage.items():
        parent = hd[opts.parents[level]]
        if opts.parents[level] == "layer":
            parent = parent[plan.layer_of_unit(device)]  # per unit
        if level == "param":
            if parent.dim():  # a per-unit array: one view per tensor
                parent = _per_tensor(parent, plan, job.params)
            else:
                parent = [parent] * len(job.params)
            new[level] = [torch.lerp(a, pv.to(a.dtype), rho) for a, pv in zip(hd[level], parent)]
        else:  # layer (parent global) or unit (parent per unit by now, or global)
            new[level] = torch.lerp(hd[level], parent.expand_as(hd[level]), rho)
    if opts.rate_bounds is not None:
        lo, hi = opts.rate_bounds
        for level, rate in new.items():
            if level == "param":
                if lo is not None:
                    torch._foreach_clamp_min_(rate, lo)
                if hi is not None:
                    torch._foreach_clamp_max_(rate, hi)
            elif lo is not None or hi is not None:
                new[level] = rate.clamp(min=lo, max=hi)

    if opts.multi_level:
        _update_weights(job, sums, h, grads, hd_gate, tau_prev)

    # Write back; entries of tensors that do not step keep their values (their sums are
    # zero, but shrinkage and clamping would still move them).
    unit_mask = plan.unit_mask(device, acc)
    for level in coarse:
        rate = _coarse_rates(opts, gs, level)
        mask = {"global": 1.0, "layer": plan.layer_mask(device, acc), "unit": unit_mask}[level]
        rate.lerp_(new[level].to(rate.dtype), hd_gate * mask)
    if "param" in opts.levels:
        param_rates = [st["param_rate"] for st in job.states]
        torch._foreach_lerp_(param_rates, new["param"], hd_gate.to(param_rates[0].dtype))


def _update_weights(job: GroupJob, sums, h, grads, hd_gate, tau_prev) -> None:
    opts, gs = job.opts, job.group_state
    acc, w = gs["weights"].dtype, gs["weights"]
    multiplicative = opts.rule == "multiplicative"
    a_dot_s, r = [], []  # per level: sum_j alpha_old[j] S[j] and R = sum_e (alpha_old g)^2
    for level in opts.levels:
        if level == "param":
            rates = [st["param_rate"] for st in job.states]
            a_dot_s.append(sum(torch.sum(a * x, dtype=acc) for a, x in zip(rates, h)))
            if multiplicative:
                r.append(sum(torch.sum((a * g) ** 2, dtype=acc) for a, g in zip(rates, grads)))
            continue
        old = _coarse_rates(opts, gs, level).to(acc)
        s, qg, _ = sums.of(level)
        a_dot_s.append((old * s).sum())
        if multiplicative:
            r.append((old * old * qg).sum())
    a_dot_s = torch.stack(a_dot_s)
    if multiplicative:
        denom = (torch.stack(r) * sums.global_[2]).sqrt()
        new_w = w * torch.where(denom > 0, 1 + opts.combination_lr * a_dot_s / denom, 1.0)
    else:
        new_w = w + opts.combination_lr * tau_prev * a_dot_s
    new_w = new_w.clamp(min=0)
    total = new_w.sum()
    new_w = torch.where(total > 0, new_w / total, 1.0 / len(opts.levels))
    w.lerp_(new_w, hd_gate)


def _applied_rates(job: GroupJob, weights, tau_t, gate):
    """kappa per tensor (broadcastable against the parameter), times the step gate."""
    opts, plan, gs = job.opts, job.plan, job.group_state
    device = weights.device
    coarse = torch.zeros((), dtype=weights.dtype, device=device)
    for k, level in enumerate(opts.levels):
        if level != "param":
            coarse = coarse + weights[k] * _broadcast_to_units(level, _coarse_rates(opts, gs, level), plan, device)
    coarse = coarse.expand(plan.layout.num_units)
    kappa_units = (tau_t * coarse + (1 - tau_t) * opts.final_lr) * gate
    kappas = [kv.to(compute_dtype(p.dtype)) for kv, p in zip(_per_tensor(kappa_units, plan, job.params), job.params)]
    if "param" in opts.levels:
        k = opts.levels.index("param")
        param_factor = tau_t * weights[k] * gate
        kappas = torch._foreach_add(
            [kv.expand(p.shape) for kv, p in zip(kappas, job.params)],
            torch._foreach_mul([st["param_rate"] for st in job.states], param_factor.to(kappas[0].dtype)),
        )
    return kappas
