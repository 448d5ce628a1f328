"""The pure-PyTorch backend: docs/algorithm.md section 2 in plain tensor operations.

The baseline the fused kernels are measured against, and the fallback where nothing
compiled runs. It runs the same three stages as the fused backends: a reduction pass
(per tensor: u_prev, h = g * u_prev, row sums into the group's flat unit array), the
shared level stage (`multilevel_hd.levels`), and an elementwise pass per tensor.

Design, measured (see bench/results/cpu.md): a loop over tensors whose every operation
is an in-place or fused one (lerp_, addcmul_, out=) beat a torch._foreach_* chain on
CPU, because the foreach chain materialises a list of full-size temporaries per
operation; the few temporaries left live in reusable scratch buffers, because PyTorch's
CPU allocator does not cache and a fresh multi-megabyte buffer costs page faults. Nothing reads a tensor value on the host: the non-finite guard and "t >= 2"
are 0-d device flags, and every tensor a step changes is stored through a select
(`torch.where(proceeds, new, old)`), so a skipped step leaves every tensor bit-identical
without a host synchronisation, whatever the gradients hold (a gate multiplied in would
not: `0 * inf` is NaN once g * g overflows). The guard's flag comes from each gradient's
max and min (cheap vectorised reads; a product or sum would also flag finite values that
overflow). Half-precision parameters are updated through float32 copies.

Under torch.compile the whole step is traced into one graph (tests/test_compile.py):
nothing here reads a tensor on the host or imports anything, the plan's tables are made
before the step (`StepPlan.prepare`), and the scratch buffers give way to fresh
temporaries, which Inductor fuses away.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..hierarchy import unit_view
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
    corrections = _BiasCorrections(job.states, opts) if opts.kind == "adam" else None
    sums = UnitSums(s=torch.zeros(plan.layout.num_units, dtype=acc, device=gs["weights"].device))
    if multiplicative:
        sums.qg, sums.qu = torch.zeros_like(sums.s), torch.zeros_like(sums.s)
    dots, squares, extremes = [], [], []
    for i, (p, grad, st, lay) in enumerate(zip(job.params, job.grads, job.states, layouts)):
        g = _effective_grad(p, grad, job)
        if opts.skip_nonfinite:  # max and min are NaN or infinite iff an element is
            extremes += [g.amax(), g.amin()]
        x, scale = _previous_direction(st, opts, corrections, i)  # u_prev = x * scale, scale per tensor
        h = torch.mul(g, x, out=_scratch("h", g))
        rows = slice(lay.unit_offset, lay.unit_offset + lay.units)
        _row_sums(h, sums.s[rows], scale)
        if param_sums:
            dot = torch.mul(st["param_rate"], h, out=h).sum(dtype=acc)
            dots.append(dot if scale is None else dot * scale)
        if multiplicative:
            _row_sums(torch.mul(x, x, out=h), sums.qu[rows], None if scale is None else scale * scale)
            _row_sums(torch.mul(g, g, out=h), sums.qg[rows])
            if param_sums:
                squares.append(torch.mul(st["param_rate"], g, out=h).square_().sum(dtype=acc))
    if param_sums:
        sums.param_dot = torch.stack(dots).sum()
        sums.param_sq = torch.stack(squares).sum() if multiplicative else None
    if opts.skip_nonfinite:
        sums.finite = torch.stack(extremes).isfinite().all()

    coeffs = update_levels(job, sums)
    gates = _Gates(coeffs, opts, can_skip=opts.skip_nonfinite or job.found_inf is not None)
    for i, (p, grad, st, lay) in enumerate(zip(job.params, job.grads, job.states, layouts)):
        g = _effective_grad(p, grad, job)
        kappa = unit_view(coeffs.kappa_units, lay, p).to(g.dtype)
        if "param" in opts.levels:
            rate = _update_param_rate(g, st, lay, p, opts, coeffs, gates.rates_move, corrections, i)
            kappa = torch.addcmul(kappa, rate, coeffs.param_kappa.to(g.dtype), out=_scratch("h", g))
        if gates.can_skip:  # a skipped step's g is poison even times 0 (NaN, or g * g = inf)
            g = torch.where(gates.proceeds, g, gates.weights(g.dtype).zero, out=_scratch("gated_grad", g))
        _step_direction(p, g, st, opts, gates, kappa, "param" in opts.levels, corrections, i)


class _BiasCorrections:
    """Adam's bias corrections of every tensor, from its own step count, made once per step
    for all tensors (a few ops on a vector, where per-tensor scalars cost a dozen small ops
    per tensor): for u_prev s = max(step, 1), for this step's u s = step + 1 (a parameter
    that never stepped has m = v = 0, hence u_prev = 0); c2 = (1 - b2^s)^(-1/2) and
    c1 = 1 / (1 - b1^s), taken in float64 as torch.optim.Adam takes them on the host (in
    float32, 1 - 0.999**s is off by 1.3e-5: 0.999 itself rounds), then in each math dtype."""

    def __init__(self, states: list, opts: GroupOptions):
        steps = torch.stack([st["step"] for st in states]).to(torch.float64)
        prev, new = steps.clamp(min=1), steps + 1
        self._table = torch.stack([(1 - opts.beta2**prev).rsqrt(), 1 / (1 - opts.beta1**prev),
                                   (1 - opts.beta2**new).rsqrt(), 1 / (1 - opts.beta1**new)])
        self._eps = opts.eps
        self._by_dtype = {}

    def __call__(self, i: int, dtype, previous: bool) -> tuple:
        """(c2, c1, eps) of tensor i as 0-d tensors of `dtype`."""
        if dtype not in self._by_dtype:
            rows = self._table.to(dtype).unbind()
            self._by_dtype[dtype] = (rows, torch.full((), self._eps, dtype=dtype, device=self._table.device))
        rows, eps = self._by_dtype[dtype]
        return (rows[0][i], rows[1][i], eps) if previous else (rows[2][i], rows[3][i], eps)


class _Gates:
    """The level stage's gates as the elementwise pass uses them, made once per step: 0-d
    bools for selects, and for Adam the moving averages' weights (1 - beta) * gate, per math
    dtype. A skipped step (gate 0) leaves m, v and p as they are by arithmetic: m + 0 * (g - m)
    is m, and kappa carries the gate, so p - kappa * u is p; its g is replaced by 0 first
    (`can_skip`: only a guarded step can be skipped, and only then is g selected), so that
    no NaN, and no g * g that overflows, meets those zeros."""

    def __init__(self, coeffs: StepCoefficients, opts: GroupOptions, can_skip: bool):
        self.proceeds, self.rates_move, self.can_skip = coeffs.gate > 0, coeffs.hd_gate > 0, can_skip
        self._gate, self._opts, self._by_dtype = coeffs.gate, opts, {}

    def weights(self, dtype) -> "_GateWeights":
        if dtype not in self._by_dtype:
            gate = self._gate.to(dtype)
            self._by_dtype[dtype] = _GateWeights(gate, gate * (1 - self._opts.beta1), gate * (1 - self._opts.beta2),
                                                 torch.zeros_like(gate))
        return self._by_dtype[dtype]


class _GateWeights(NamedTuple):
    """_Gates' 0-d tensors in one math dtype."""

    gate: torch.Tensor
    beta1: torch.Tensor  # (1 - beta1) * gate: m's weight
    beta2: torch.Tensor  # (1 - beta2) * gate: v's weight
    zero: torch.Tensor


class _Scratch:
    """Full-size temporaries reused across tensors and steps, one buffer per slot name.

    A view comes back with the strides of the tensor it stands for (contiguous or
    channels_last), so elementwise operations between them stay dense."""

    def __init__(self):
        self._buffers = {}

    def __call__(self, slot: str, like: torch.Tensor, dtype=None) -> torch.Tensor:
        dtype = dtype or like.dtype
        if torch.compiler.is_compiling():  # under torch.compile temporaries are the compiler's
            return torch.empty_like(like, dtype=dtype)
        key = (slot, like.device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._buffers[key] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        flat = buf[: like.numel()]
        if like.is_contiguous():
            return flat.view(like.shape)
        if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
            n, c, hgt, wid = like.shape
            return flat.view(n, hgt, wid, c).permute(0, 3, 1, 2)
        return torch.empty_like(like, dtype=dtype)


_scratch = _Scratch()


def _row_sums(x: torch.Tensor, out: torch.Tensor, scale=None) -> None:
    """out = the sums of x over each unit (dim-0 slice), times `scale` if given."""
    if x.dim() >= 2:
        torch.sum(x, dim=tuple(range(1, x.dim())), dtype=out.dtype, out=out)
    else:
        out.copy_(x.reshape(-1))
    if scale is not None:
        out.mul_(scale)


def _effective_grad(p, grad, job: GroupJob) -> torch.Tensor:
    """g of docs/algorithm.md step 1 in the math dtype (unscaled if a GradScaler scaled it); the
    gradient itself when nothing changes it."""
    opts, dtype = job.opts, compute_dtype(grad.dtype)
    g = grad if grad.dtype == dtype else _scratch("g", grad, dtype).copy_(grad)
    if opts.maximize or job.grad_scale is not None:
        g = torch.mul(g, job.grad_factor(dtype), out=_scratch("g", g))
    if opts.weight_decay > 0 and not opts.decoupled_weight_decay:
        g = torch.add(g, p, alpha=opts.weight_decay, out=_scratch("g", g))
    return g


def _adam_direction(m, v, c2, eps_tensor, eps: float):
    """x = m / (sqrt(v) * c2 + eps) (amsgrad: v is vmax); Adam's u is x * c1, the per-tensor
    c1 left to the caller, who applies it to something smaller than x. m = 0 gives m
    itself, also with eps = 0 (a parameter that never stepped: 0, not 0/0)."""
    x = torch.sqrt(v, out=_scratch("x", m))
    torch.addcmul(eps_tensor, x, c2, out=x)
    x = torch.div(m, x, out=x)
    if eps == 0:  # only then can the division be 0/0
        x = torch.where(m == 0, m, x, out=x)
    return x


def _previous_direction(st: dict, opts: GroupOptions, corrections, i: int):
    """u_prev of tensor i as (x, scale) with u_prev = x * scale; scale None means 1."""
    if opts.kind == "adam":
        m = st["exp_avg"]
        c2, c1, eps = corrections(i, m.dtype, previous=True)
        return _adam_direction(m, st["max_exp_avg_sq" if opts.amsgrad else "exp_avg_sq"], c2, eps, opts.eps), c1
    return st["prev_direction" if opts.stores_direction else "momentum_buffer"], None


def _step_direction(p, g, st: dict, opts: GroupOptions, gates: _Gates, kappa, kappa_is_scratch: bool,
                    corrections, i: int) -> None:
    """This step's base direction u, the new base state and p - kappa * u (after decoupled
    decay), in place. A skipped step changes nothing (see _Gates): Adam's state by its
    gated weights, SGD's buffers through a select, p by kappa. A full-size kappa lives in
    scratch and may be scaled in place; a per-unit one is a view of the level stage's
    array and must not be."""
    p_work = p if p.dtype == g.dtype else _scratch("param", g).copy_(p)
    gate, w1, w2, _ = gates.weights(g.dtype)
    if opts.decoupled_weight_decay and opts.weight_decay > 0:
        p_work.addcmul_(p_work, kappa, value=-opts.weight_decay)
    if opts.kind == "adam":
        m = st["exp_avg"].lerp_(g, w1)
        v = st["exp_avg_sq"].lerp_(torch.mul(g, g, out=_scratch("exp_avg_sq", g)), w2)
        if opts.amsgrad:  # the maximum of the raw v, after this step's update (torch.optim.Adam)
            v = torch.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
        c2, c1, eps = corrections(i, g.dtype, previous=False)
        u = _adam_direction(m, v, c2, eps, opts.eps)
        kappa = kappa.mul_(c1) if kappa_is_scratch else kappa * c1
    else:
        u = g
        if opts.momentum != 0:
            # buf = g at the parameter's first step: buf is still zero then, so only g's factor changes
            first = (st["step"] == 0).to(g.dtype)
            buf = torch.mul(st["momentum_buffer"], opts.momentum, out=_scratch("momentum_buffer", g))
            buf.addcmul_(g, 1 - opts.dampening * (1 - first))
            u = torch.where(gates.proceeds, buf, st["momentum_buffer"], out=st["momentum_buffer"])
            if opts.nesterov:
                u = torch.add(g, u, alpha=opts.momentum, out=_scratch("x", g))
        if opts.stores_direction:
            torch.where(gates.proceeds, u, st["prev_direction"], out=st["prev_direction"])
    p_work.addcmul_(u, kappa, value=-1)
    st["step"].add_(gate.to(st["step"].dtype))
    if p_work is not p:  # half precision: p_work is p in float32, exactly p where the step is skipped
        p.copy_(p_work)


def _update_param_rate(g, st: dict, lay, p, opts: GroupOptions, coeffs: StepCoefficients,
                       rates_move, corrections, i: int) -> torch.Tensor:
    """The param level's HD update, shrinkage and clamp for one tensor, stored where
    `rates_move` (a 0-d bool: the step proceeds and t >= 2); runs before the base state
    moves, so u_prev is still the previous direction."""
    rate = st["param_rate"]
    x, scale = _previous_direction(st, opts, corrections, i)
    new = torch.mul(g, x, out=_scratch("h", g))  # h = g * u_prev, then the new rate in place
    if scale is not None:
        new.mul_(scale)
    coef = coeffs.param_hd.to(rate.dtype)
    if opts.rule == "multiplicative":
        new.sign_().mul_(coef).add_(1).mul_(rate)
    else:
        torch.addcmul(rate, new, coef, out=new)
    if "param" in opts.shrinkage:
        parent = coeffs.param_parent
        parent = unit_view(parent, lay, p) if parent.dim() else parent
        new.lerp_(parent.to(rate.dtype).expand_as(new), opts.shrinkage["param"])
    if opts.rate_bounds is not None and opts.rate_bounds != (None, None):
        new.clamp_(*opts.rate_bounds)
    return torch.where(rates_move, new, rate, out=rate)
