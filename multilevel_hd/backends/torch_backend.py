"""The pure-PyTorch backend: SPEC section 2 in plain tensor operations.

The baseline the fused kernels are measured against, and the fallback where nothing
compiled runs. It runs the same three stages as the fused backends: a reduction pass
(per tensor: u_prev, h = g * u_prev, row sums into the group's flat unit array), the
shared level stage (`multilevel_hd.levels`), and an elementwise pass per tensor.

Design, measured (see bench/results/cpu.md): a loop over tensors whose every operation
is an in-place or fused one (lerp_, addcmul, addcmul_) beat a torch._foreach_* chain on
CPU, because the foreach chain materialises a list of full-size temporaries per
operation. Nothing reads a tensor value on the host: the non-finite guard and "t >= 2"
are 0/1 device tensors that gate every update (a state update becomes
`lerp(old, new, gate)`, the parameter update is scaled by the gate), so a skipped step
leaves every tensor as it was without a host synchronisation. The guard reads the flag
off the unit sums: a NaN or Inf anywhere in g makes its row sum of g * u_prev non-finite
(0 * Inf is NaN too). Half-precision parameters are updated through float32 copies.
"""
from __future__ import annotations

import torch

from ..levels import StepCoefficients, UnitSums, update_levels
from ..options import GroupOptions
from ..state import GroupJob, compute_dtype

name = "torch"


def unavailable_reason(device):
    return None


def step(job: GroupJob) -> None:
    opts, plan, gs = job.opts, job.plan, job.group_state
    acc = gs["weights"].dtype
    layouts = plan.active_layouts
    multiplicative = opts.rule == "multiplicative"
    param_sums = "param" in opts.levels and opts.multi_level
    device = gs["weights"].device
    sums = UnitSums(s=torch.zeros(plan.layout.num_units, dtype=acc, device=device))
    if multiplicative:
        sums.qg, sums.qu = torch.zeros_like(sums.s), torch.zeros_like(sums.s)
    dots, squares = [], []
    for p, grad, st, lay in zip(job.params, job.grads, job.states, layouts):
        g = _effective_grad(p, grad, opts)
        # u_prev = x * scale with a per-tensor scale, applied to the (small) sums
        x, scale = _previous_direction(st, opts)
        gx = g * x
        rows = slice(lay.unit_offset, lay.unit_offset + lay.units)
        _row_sums(gx, sums.s[rows], scale)
        if multiplicative:
            _row_sums(g * g, sums.qg[rows])
            _row_sums(x * x, sums.qu[rows], None if scale is None else scale * scale)
        if param_sums:
            dot = torch.sum(st["param_rate"] * gx, dtype=acc)
            dots.append(dot if scale is None else dot * scale)
            if multiplicative:
                squares.append(torch.sum((st["param_rate"] * g) ** 2, dtype=acc))
    if param_sums:
        sums.param_dot = torch.stack(dots).sum()
        sums.param_sq = torch.stack(squares).sum() if multiplicative else None
    if opts.skip_nonfinite:
        sums.finite = sums.s.sum().isfinite()

    coeffs = update_levels(opts, plan, gs, sums)

    for p, grad, st, lay in zip(job.params, job.grads, job.states, layouts):
        g = _effective_grad(p, grad, opts)
        if opts.skip_nonfinite:  # so that the gated arithmetic below stays finite
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        kappa = _unit_view(coeffs.kappa_units, lay, p).to(g.dtype)
        if "param" in opts.levels:
            rate = _update_param_rate(g, st, lay, p, opts, coeffs)
            kappa = torch.addcmul(kappa, rate, coeffs.param_kappa.to(g.dtype))
        p_math = p if p.dtype == g.dtype else p.float()
        if opts.decoupled_weight_decay and opts.weight_decay > 0:
            p_math.mul_(1 - kappa * opts.weight_decay)
        _step_direction(p_math, g, st, opts, coeffs.gate.to(g.dtype), kappa)
        if p_math is not p:
            p.copy_(p_math)


def _unit_view(per_unit: torch.Tensor, lay, p) -> torch.Tensor:
    """A tensor's slice of a per-unit array, shaped to broadcast against the tensor."""
    shape = (p.shape[0],) + (1,) * (p.dim() - 1) if p.dim() else ()
    return per_unit[lay.unit_offset : lay.unit_offset + lay.units].view(shape)


def _row_sums(x: torch.Tensor, out: torch.Tensor, scale=None) -> None:
    """out = the sums of x over each unit (dim-0 slice), times `scale` if given."""
    if x.dim() >= 2:
        torch.sum(x, dim=tuple(range(1, x.dim())), dtype=out.dtype, out=out)
    else:
        out.copy_(x.reshape(-1))
    if scale is not None:
        out.mul_(scale)


def _effective_grad(p, grad, opts: GroupOptions) -> torch.Tensor:
    g = grad.to(compute_dtype(grad.dtype))
    if opts.maximize:
        g = -g
    if opts.weight_decay > 0 and not opts.decoupled_weight_decay:
        g = g.add(p, alpha=opts.weight_decay)
    return g


def _adam_direction(st: dict, opts: GroupOptions):
    """Adam's u = x * scale: x = m / (sqrt(v) / sqrt(1 - b2^s) + eps), scale = 1 / (1 - b1^s),
    s = max(step, 1) (a parameter that never stepped has m = v = 0, hence u = 0). The
    per-tensor scale is left to the caller, who applies it to something smaller than x."""
    m = st["exp_avg"]
    s = st["step"].to(m.dtype).clamp(min=1)
    denom = st["exp_avg_sq"].sqrt()
    torch.addcmul(torch.full((), opts.eps, dtype=m.dtype, device=m.device), denom,
                  (1 - opts.beta2**s).rsqrt(), out=denom)
    return torch.div(m, denom, out=denom), 1 / (1 - opts.beta1**s)


def _previous_direction(st: dict, opts: GroupOptions):
    """u_prev as (x, scale) with u_prev = x * scale; scale None means 1."""
    if opts.kind == "adam":
        return _adam_direction(st, opts)
    return st["prev_direction" if opts.stores_direction else "momentum_buffer"], None


def _step_direction(p, g, st: dict, opts: GroupOptions, gate, kappa) -> None:
    """Advance the base state by this step's g and apply p -= kappa * u, all gated."""
    if opts.kind == "adam":
        st["exp_avg"].lerp_(g, (1 - opts.beta1) * gate)
        st["exp_avg_sq"].lerp_(g * g, (1 - opts.beta2) * gate)
        st["step"].add_(gate.float())
        u, scale = _adam_direction(st, opts)
        kappa = kappa * scale
    else:
        u = g
        if opts.momentum != 0:
            buf = st["momentum_buffer"]
            # The first step sets buf = g: buf is still zero then, so only g's factor changes.
            first = (st["step"] == 0).to(g.dtype)
            buf.mul_(1 - (1 - opts.momentum) * gate)
            buf.add_(g * ((1 - opts.dampening * (1 - first)) * gate))
            u = g.add(buf, alpha=opts.momentum) if opts.nesterov else buf
        if opts.stores_direction:
            st["prev_direction"].lerp_(u, gate)
        st["step"].add_(gate.float())
    p.addcmul_(u, kappa, value=-1)  # kappa is zero when the step is skipped


def _update_param_rate(g, st: dict, lay, p, opts: GroupOptions, coeffs: StepCoefficients) -> torch.Tensor:
    """The param level's HD update, shrinkage and clamp for one tensor, gated by hd_gate;
    runs before the base state moves, so u_prev is still the previous direction."""
    rate = st["param_rate"]
    x, scale = _previous_direction(st, opts)
    h = g * x if scale is None else g * x * scale
    coef = coeffs.param_hd.to(rate.dtype)
    if opts.rule == "multiplicative":
        new = rate * (1 + coef * torch.sign(h))
    else:
        new = torch.addcmul(rate, h, coef)
    if "param" in opts.shrinkage:
        parent = coeffs.param_parent
        parent = _unit_view(parent, lay, p) if parent.dim() else parent
        new.lerp_(parent.to(rate.dtype).expand_as(new), opts.shrinkage["param"])
    if opts.rate_bounds is not None and opts.rate_bounds != (None, None):
        new.clamp_(*opts.rate_bounds)
    return rate.lerp_(new, coeffs.hd_gate.to(rate.dtype))
