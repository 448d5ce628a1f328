"""The pure-PyTorch backend: SPEC section 2 with foreach and batched operations.

The baseline the fused kernels are measured against, and the fallback where nothing
compiled runs. It runs the three stages of every fast backend: a reduction into the
group's flat unit array (one row sum per tensor), the shared level stage
(`multilevel_hd.levels`), and an elementwise pass (foreach operations). Nothing reads a
tensor value on the host: the non-finite guard and "t >= 2" are 0/1 device tensors that
gate every update (a state update becomes `lerp(old, new, gate)`, the parameter update is
scaled by the gate), so a skipped step leaves every tensor as it was without a sync.
Half-precision parameters are updated through float32 copies, with float32 state.
"""
from __future__ import annotations

import torch

from ..hierarchy import StepPlan
from ..levels import StepCoefficients, UnitSums, update_levels
from ..options import GroupOptions
from ..state import GroupJob, compute_dtype

name = "torch"


def unavailable_reason(device):
    return None


def step(job: GroupJob) -> None:
    opts, plan = job.opts, job.plan
    params = [p if p.dtype == compute_dtype(p.dtype) else p.float() for p in job.params]
    grads = [g.to(compute_dtype(g.dtype)) for g in job.grads]
    if opts.maximize:
        grads = torch._foreach_neg(grads)
    if opts.weight_decay > 0 and not opts.decoupled_weight_decay:
        grads = torch._foreach_add(grads, params, alpha=opts.weight_decay)
    finite = None
    if opts.skip_nonfinite:
        finite = torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
        # Zero the non-finite values so that the gated arithmetic stays finite (a NaN
        # times a zero gate is still NaN); when nothing is zeroed the step proceeds.
        grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]

    u_prev = _previous_directions(job)
    h = torch._foreach_mul(grads, u_prev)
    sums = _reduce(job, grads, u_prev, h, finite)
    coeffs = update_levels(opts, plan, job.group_state, sums)
    if "param" in opts.levels:
        _update_param_rates(job, h, coeffs)
    directions = _advance_directions(job, grads, coeffs.gate)
    kappas = _applied_rates(job, coeffs)
    if opts.decoupled_weight_decay and opts.weight_decay > 0:
        torch._foreach_mul_(params, [1 - kappa * opts.weight_decay for kappa in kappas])
    torch._foreach_addcmul_(params, directions, kappas, value=-1)
    for p, p_math in zip(job.params, params):
        if p is not p_math:
            p.copy_(p_math)


def _unit_shape(p):
    return (p.shape[0],) + (1,) * (p.dim() - 1) if p.dim() else ()


def _per_tensor(per_unit: torch.Tensor, plan: StepPlan, params):
    """Views of a per-unit array, each shaped to broadcast against its parameter."""
    return [
        per_unit[lay.unit_offset : lay.unit_offset + lay.units].view(_unit_shape(p))
        for p, lay in zip(params, plan.active_layouts)
    ]


def _unit_sums(xs, plan: StepPlan, dtype) -> torch.Tensor:
    """Row sums of each tensor of `xs` into the group's flat unit array (zeros elsewhere)."""
    out = torch.zeros(plan.layout.num_units, dtype=dtype, device=xs[0].device)
    for x, lay in zip(xs, plan.active_layouts):
        rows = out[lay.unit_offset : lay.unit_offset + lay.units]
        if x.dim() >= 2:
            torch.sum(x, dim=tuple(range(1, x.dim())), dtype=dtype, out=rows)
        else:
            rows.copy_(x.reshape(-1))
    return out


def _reduce(job: GroupJob, grads, u_prev, h, finite) -> UnitSums:
    opts, plan = job.opts, job.plan
    acc = job.group_state["weights"].dtype
    multiplicative = opts.rule == "multiplicative"
    sums = UnitSums(s=_unit_sums(h, plan, acc), finite=finite)
    if multiplicative:
        sums.qg = _unit_sums(torch._foreach_mul(grads, grads), plan, acc)
        sums.qu = _unit_sums(torch._foreach_mul(u_prev, u_prev), plan, acc)
    if "param" in opts.levels and opts.multi_level:
        rates = [st["param_rate"] for st in job.states]
        sums.param_dot = sum(torch.sum(a * x, dtype=acc) for a, x in zip(rates, h))
        if multiplicative:
            sums.param_sq = sum(torch.sum((a * g) ** 2, dtype=acc) for a, g in zip(rates, grads))
    return sums


def _adam_directions(job: GroupJob):
    """(m / (1 - b1^s)) / (sqrt(v / (1 - b2^s)) + eps), s = max(step, 1): zero if never stepped."""
    opts, states = job.opts, job.states
    exp_avgs = [st["exp_avg"] for st in states]
    steps = [st["step"].to(m.dtype).clamp(min=1) for st, m in zip(states, exp_avgs)]
    bc1 = torch._foreach_neg(torch._foreach_sub(torch._foreach_pow(opts.beta1, steps), 1))
    bc2 = torch._foreach_neg(torch._foreach_sub(torch._foreach_pow(opts.beta2, steps), 1))
    denom = torch._foreach_div([st["exp_avg_sq"] for st in states], bc2)
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
    g_gate = gate.to(grads[0].dtype)
    if opts.kind == "adam":
        torch._foreach_lerp_([st["exp_avg"] for st in states], grads, (1 - opts.beta1) * g_gate)
        torch._foreach_lerp_([st["exp_avg_sq"] for st in states], torch._foreach_mul(grads, grads), (1 - opts.beta2) * g_gate)
        torch._foreach_add_(steps, gate.float())
        return _adam_directions(job)
    directions = grads
    if opts.momentum != 0:
        bufs = [st["momentum_buffer"] for st in states]
        # The first step sets buf = g: buf is still zero then, so only g's factor changes.
        g_factor = [(1 - opts.dampening * (s != 0).to(g_gate.dtype)) * g_gate for s in steps]
        torch._foreach_mul_(bufs, 1 - (1 - opts.momentum) * g_gate)
        torch._foreach_addcmul_(bufs, grads, g_factor)
        directions = torch._foreach_add(grads, bufs, alpha=opts.momentum) if opts.nesterov else bufs
    if opts.stores_direction:
        torch._foreach_lerp_([st["prev_direction"] for st in states], directions, g_gate)
    torch._foreach_add_(steps, gate.float())
    return directions


def _update_param_rates(job: GroupJob, h, coeffs: StepCoefficients) -> None:
    """The param level's HD update, shrinkage and clamp (elementwise), gated by hd_gate."""
    opts, plan = job.opts, job.plan
    rates = [st["param_rate"] for st in job.states]
    coef = coeffs.param_hd.to(rates[0].dtype)
    if opts.rule == "multiplicative":
        factor = torch._foreach_mul(torch._foreach_sign(h), coef)
        torch._foreach_add_(factor, 1)
        new = torch._foreach_mul(rates, factor)
    else:
        new = torch._foreach_add(rates, torch._foreach_mul(h, coef))
    if "param" in opts.shrinkage:
        parent = coeffs.param_parent
        parents = _per_tensor(parent, plan, job.params) if parent.dim() else [parent] * len(rates)
        new = [torch.lerp(a, pv.to(a.dtype), opts.shrinkage["param"]) for a, pv in zip(new, parents)]
    if opts.rate_bounds is not None:
        lo, hi = opts.rate_bounds
        if lo is not None:
            torch._foreach_clamp_min_(new, lo)
        if hi is not None:
            torch._foreach_clamp_max_(new, hi)
    torch._foreach_lerp_(rates, new, coeffs.hd_gate.to(rates[0].dtype))


def _applied_rates(job: GroupJob, coeffs: StepCoefficients):
    """kappa per tensor, gated (zero for a skipped step), broadcastable against the parameter."""
    kappas = [
        kv.to(compute_dtype(p.dtype)) for kv, p in zip(_per_tensor(coeffs.kappa_units, job.plan, job.params), job.params)
    ]
    if "param" in job.opts.levels:
        rates = [st["param_rate"] for st in job.states]
        kappas = torch._foreach_add(
            [kv.expand(p.shape) for kv, p in zip(kappas, job.params)],
            torch._foreach_mul(rates, coeffs.param_kappa.to(rates[0].dtype)),
        )
    return kappas
