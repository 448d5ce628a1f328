"""The pure-PyTorch backend: docs/algorithm.md section 2 in plain tensor operations.

The baseline the fused kernels are measured against, and the fallback where nothing
compiled runs. It runs the same three stages as the fused backends: a reduction pass
(u_prev, h = g * u_prev, row sums into the group's flat unit array), the shared level
stage (`multilevel_hd.levels`), and an elementwise pass.

Two paths compute the same math:

* `_step_foreach`, for a group of one float32 or float64 dtype on one device, outside
  torch.compile and unsharded: torch._foreach_* operations over all tensors, and single
  operations over flat buffers that hold every tensor's g, and u_prev or Adam's
  denominators, side by side (made once per plan). The buffers are ordered by row
  length, so the row sums of all tensors take one sum per distinct row length. The param
  level's rates are copied into such a buffer, updated there and copied back, and its
  applied rate per element is one more (`_update_param_rates`; two more buffers of the
  group's size: ResNet-50, 2 x 100 MB in float32). Adam's
  moments and direction come from ATen's fused Adam kernel (`_adam_apply`). The ATen
  operations a step dispatches do not grow with the number of tensors
  (tests/test_torch_backend_ops.py). A skipped step (NaN/Inf gradient, GradScaler's
  found_inf) is the kernel's found_inf for Adam; for SGD it runs with g = 0, where every
  update is the identity (kappa = 0, buffers scaled by 1 plus 0, stored directions lerped
  with weight 0), so nothing is selected per state tensor and nothing is read on the host;
  every tensor stays the same up to the sign of a zero (-0.0 + +0.0 is +0.0).
* `_step_per_tensor`, for everything else (sharded groups, half or mixed precision,
  Adam with eps = 0, with moments of a tensor in different layouts or on a
  device without ATen's fused Adam kernel, and under torch.compile, where Inductor fuses
  either path and this one needs no per-plan buffers): a loop over tensors whose every
  operation is an in-place or fused one (lerp_, addcmul_, out=), with its few temporaries in reusable
  scratch buffers and Adam's bias corrections made once per step for all tensors. A
  skipped step selects g = 0 once per tensor and leaves Adam's moments and p by gated
  arithmetic (see `_Gates`), SGD's buffers through a select (`torch.where(proceeds, new,
  old)`); every tensor stays the same up to the sign of a zero, as on the foreach path.

Measured on 2 vCPUs (an AMD EPYC, 2 threads), against torch.optim.Adam(foreach=True) in
the same run (medians of per-round ratios): the foreach path steps MultiLevelAdam
[global+unit] on ResNet-50 shapes at 1.11x its time (bench/results/cpu-amd.md; ResNet-18
1.28x), 62 tensors of 16 elements at 1.22x, of 4,096 at 1.38x (30 rounds, a quiet machine,
with the level stage at 60 ATen operations). On a busy machine, before the level stage was
trimmed, the fused kernel alone took ResNet-50 from 1.35-1.9x to 1.14-1.43x, 62 x 16 from
1.9-1.95x to 1.6-1.85x, 62 x 4,096 from 1.65-2.3x to 1.55-1.75x (its apply pass went from
about 9 passes over the elements to 3).
With the param level ([global+layer+param], ResNet-50) the foreach path dispatches 249 ATen
operations a step where the per-tensor loop dispatched 11,546 (ResNet-152: 249 against
33,272), in 0.62-0.95x its time (medians of per-round ratios, 12-31 interleaved rounds,
five runs: 0.62-0.65 in three, 0.94-0.95 in two, when the loop itself ran 20 % faster).
The gain is bounded by memory: the flat buffers are streamed about 15 times, where the
loop works on one tensor at a time in cache.
The per-tensor loop took 2.0-2.5x, 9.5x and 7x before its bias corrections were batched
and its selects cut (ResNet-50: 132 -> 98 ms). Full-size CPU temporaries are avoided on
both paths: PyTorch's CPU allocator does not cache, and a fresh multi-megabyte buffer
costs its page faults again (an out-of-place sqrt of 9.4M floats: 25 ms; in place: 2 ms).
The guard's flag comes from the gradients' max and min (cheap vectorised reads; a product
or sum would also flag finite values that overflow). Half-precision parameters are updated
through float32 copies.

Under torch.compile the whole step is traced into one graph (tests/test_compile.py):
nothing here reads a tensor on the host or imports anything, the plan's tables are made
before the step (`StepPlan.prepare`), and the scratch buffers give way to fresh
temporaries, which Inductor fuses away.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # as torch.optim.Adam(fused=True)

from ..hierarchy import unit_view
from ..levels import StepCoefficients, UnitSums, update_levels
from ..options import GroupOptions
from ..state import GroupJob, compute_dtype

name = "torch"


def unavailable_reason(device):
    return None


def step(job: GroupJob) -> None:
    if _foreach_applies(job):
        _step_foreach(job)
    else:
        _step_per_tensor(job)


def _step_per_tensor(job: GroupJob) -> None:
    """The general path: one tensor at a time (sharded groups, mixed or half precision,
    Adam with eps = 0, and under torch.compile)."""
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
    """The param level's rates of one tensor, stored where `rates_move` (a 0-d bool: the
    step proceeds and t >= 2); runs before the base state moves, so u_prev is still the
    previous direction."""
    rate = st["param_rate"]
    x, scale = _previous_direction(st, opts, corrections, i)
    h = torch.mul(g, x, out=_scratch("h", g))
    if scale is not None:
        h.mul_(scale)
    parents = None
    if "param" in opts.shrinkage:
        parent = coeffs.param_parent.to(rate.dtype)
        parents = [unit_view(parent, lay, p) if parent.dim() else parent]
    new = _new_param_rates(h, [h], parents, rate, coeffs, opts)
    return torch.where(rates_move, new, rate, out=rate)


def _new_param_rates(h: torch.Tensor, h_views: list, parents, rate: torch.Tensor, coeffs: StepCoefficients,
                     opts: GroupOptions) -> torch.Tensor:
    """docs/algorithm.md step 4 for the param level, written over h = g * u_prev (one tensor's,
    or a flat buffer of all): the HD update of the old rates `rate`, shrinkage toward the
    parent level's HD-updated rates (`parents`: one per view of h in `h_views`, broadcasting
    against it, where tensors and units meet) and the clamp. The caller stores it where the
    rates move."""
    coef = coeffs.param_hd.to(rate.dtype)
    if opts.rule == "multiplicative":  # 1 + coef * sign(h) in one pass (the product is exact)
        torch.addcmul(torch.ones_like(coef), h.sign_(), coef, out=h).mul_(rate)
    else:
        torch.addcmul(rate, h, coef, out=h)
    if "param" in opts.shrinkage:
        torch._foreach_lerp_(h_views, parents, opts.shrinkage["param"])
    if opts.rate_bounds is not None and opts.rate_bounds != (None, None):
        h.clamp_(*opts.rate_bounds)
    return h


# The foreach path: every stage is a few torch._foreach_* operations over all tensors of
# the group, or one operation over a flat buffer that holds them side by side, so the
# operations a step dispatches do not grow with the number of tensors.


def _foreach_applies(job: GroupJob) -> bool:
    """Whether `_step_foreach` covers this group's step. Under torch.compile the per-tensor
    path is traced instead: Inductor fuses either one, and that one needs no per-plan buffers."""
    opts = job.opts
    dtypes = {t.dtype for t in job.params} | {t.dtype for t in job.grads}
    return (not torch.compiler.is_compiling() and job.sharding_group is None
            and len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}
            and len({t.device for t in job.params}) == 1
            and not (opts.kind == "adam" and not _fused_adam_applies(job)))


def _fused_adam_applies(job: GroupJob) -> bool:
    """Whether ATen's fused Adam kernel (`_adam_apply`) can step this group: eps > 0 (else
    0 / 0 where m = v = 0), a device it is built for (as torch.optim.Adam(fused=True) asks),
    and moments it can walk."""
    return (job.opts.eps > 0 and job.params[0].device.type in _get_fused_kernels_supported_devices()
            and _moments_share_a_dense_layout(job))


def _moments_share_a_dense_layout(job: GroupJob) -> bool:
    """Whether each tensor's Adam moments (m, v, vmax) have one set of strides that covers
    their storage without gaps or overlaps: ATen's fused Adam kernel walks them in storage
    order (`_adam_apply`), with g and the scratch given in the same order."""
    keys = ("exp_avg_sq", "max_exp_avg_sq") if job.opts.amsgrad else ("exp_avg_sq",)
    for st in job.states:
        m = st["exp_avg"]
        if any(st[k].stride() != m.stride() for k in keys) or not (m.is_contiguous() or _is_dense(m)):
            return False
    return True


def _is_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its storage span exactly once (any order of dimensions)."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


class _FlatLayout:
    """A plan's tensors side by side in one flat buffer, ordered by row length (elements per
    unit, stable), so that the units of one row length are rows of one [units, row_len]
    block: the row sums of all tensors take one sum per distinct row length, not one per tensor.

    `views(flat)`: each tensor's place in `flat`, in the plan's order, shaped (contiguous)
    like the tensor. `unit_index`: for each row of the blocks in turn, its unit in the
    group's flat unit array; `tensor_of_row`: its tensor's position in the plan."""

    def __init__(self, plan, shapes, device):
        layouts = plan.active_layouts
        order = sorted(range(len(layouts)), key=lambda i: layouts[i].row_len)
        self._places, self.blocks = [None] * len(layouts), []
        unit_index, tensor_of_row, offset = [], [], 0
        for i in order:
            lay = layouts[i]
            self._places[i] = (offset, lay.numel, shapes[i])
            if self.blocks and self.blocks[-1][2] == lay.row_len:
                start, units, row_len = self.blocks[-1]
                self.blocks[-1] = (start, units + lay.units, row_len)
            else:
                self.blocks.append((offset, lay.units, lay.row_len))
            unit_index += range(lay.unit_offset, lay.unit_offset + lay.units)
            tensor_of_row += [i] * lay.units
            offset += lay.numel
        self.numel = offset
        self.unit_index = torch.tensor(unit_index, device=device)
        self.tensor_of_row = torch.tensor(tensor_of_row, device=device)

    def views(self, flat: torch.Tensor) -> list:
        return [flat[offset : offset + numel].view(shape) for offset, numel, shape in self._places]

    def _blocks(self, flat: torch.Tensor):
        return [flat[start : start + units * row_len].view(units, row_len) for start, units, row_len in self.blocks]

    def row_sums(self, flat: torch.Tensor) -> torch.Tensor:
        """The sums of the rows of a flat buffer, in block order."""
        return torch.cat([block.sum(1) for block in self._blocks(flat)])

    def row_squares(self, flat: torch.Tensor) -> torch.Tensor:
        """The sums of the squares of the rows, in block order: as squared norms, which read
        the buffer once (a square and a sum would write and read a full-size temporary)."""
        return torch.cat([torch.linalg.vector_norm(block, dim=1) for block in self._blocks(flat)]).square()


def _flat_layout(job: GroupJob) -> _FlatLayout:
    device = job.params[0].device
    return job.plan.cached(("foreach_layout", device),
                           lambda: _FlatLayout(job.plan, [p.shape for p in job.params], device))


def _flat_views(job: GroupJob, slot: str) -> tuple[torch.Tensor, list]:
    """A flat buffer of the plan's elements for `slot` and its per-tensor views, made once per plan."""
    flat = _flat_layout(job)
    p = job.params[0]

    def make():
        buf = torch.empty(flat.numel, dtype=p.dtype, device=p.device)
        return buf, flat.views(buf)

    return job.plan.cached(("foreach_flat", slot, p.device, p.dtype), make)


def _unit_views(job: GroupJob, slot: str, per_unit: torch.Tensor) -> list:
    """`per_unit` (one value per unit of the group) as one view per tensor that broadcasts
    against it, through a buffer made once per plan (views of a fresh array would take two
    operations per tensor and step)."""
    p = job.params[0]

    def make():
        buf = torch.empty(job.plan.layout.num_units, dtype=p.dtype, device=p.device)
        return buf, [unit_view(buf, lay, q) for lay, q in zip(job.plan.active_layouts, job.params)]

    buf, views = job.plan.cached(("foreach_units", slot, p.device, p.dtype), make)
    buf.copy_(per_unit)
    return views


def _adam_denominators(job: GroupJob, exp_avg_sqs, steps: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor]:
    """`_adam_direction` for all tensors, up to the division: x = m / denominator with the
    denominators sqrt(v) + eps * sqrt(1 - b2^s) in the flat "denominator" buffer (flat, and
    as per-tensor views), and the scale sqrt(1 - b2^s) / (1 - b1^s) as a vector (one per
    tensor): the bias correction of v moves into the scale, so it costs no pass over the
    elements. Every full-size operation is in place on a buffer made once per plan: a fresh
    one costs its page faults again. `steps`: the tensors' step counts as one vector."""
    opts = job.opts
    s = steps.to(torch.float64).clamp(min=1)
    root = (1 - opts.beta2**s).sqrt()
    denom_flat, denom = _flat_views(job, "denominator")
    torch._foreach_copy_(denom, exp_avg_sqs)
    denom_flat.sqrt_()
    torch._foreach_add_(denom, torch.unbind((opts.eps * root).to(denom_flat.dtype)))
    return denom_flat, denom, (root / (1 - opts.beta1**s)).to(denom_flat.dtype)


def _state_list(job: GroupJob, key: str) -> list:
    return [st[key] for st in job.states]


def _step_foreach(job: GroupJob) -> None:
    opts, plan = job.opts, job.plan
    flat = _flat_layout(job)
    params, dtype = job.params, job.params[0].dtype
    steps = _state_list(job, "step")
    step_counts = torch.stack(steps)  # before this step
    g_flat, g = _flat_views(job, "grad")
    torch._foreach_copy_(g, job.grads)
    if opts.maximize or job.grad_scale is not None:
        torch._foreach_mul_(g, job.grad_factor(dtype))
    if opts.weight_decay > 0 and not opts.decoupled_weight_decay:
        torch._foreach_add_(g, params, alpha=opts.weight_decay)

    # Reduction: u_prev into a flat buffer beside g's, then per unit the sums of their rows.
    if opts.kind == "adam":
        v_key = "max_exp_avg_sq" if opts.amsgrad else "exp_avg_sq"
        x_flat, x, scale = _adam_denominators(job, _state_list(job, v_key), step_counts)
        x_flat.reciprocal_()  # x = m / denominator, in place (a copy of m and a division cost more)
        torch._foreach_mul_(x, _state_list(job, "exp_avg"))
        row_scale = scale[flat.tensor_of_row]
    else:
        x_flat, x = _flat_views(job, "direction")
        torch._foreach_copy_(x, _state_list(job, "prev_direction" if opts.stores_direction else "momentum_buffer"))
        row_scale = None

    def unit_sums(rows, factor=None):  # rows in block order -> the group's flat unit array
        rows = rows if factor is None else rows * factor
        return torch.zeros(plan.layout.num_units, dtype=dtype, device=rows.device).index_copy_(0, flat.unit_index, rows)

    sums = UnitSums(s=None)
    if opts.rule == "multiplicative":
        sums.qg = unit_sums(flat.row_squares(g_flat))
        sums.qu = unit_sums(flat.row_squares(x_flat), None if row_scale is None else row_scale * row_scale)
    x_flat.mul_(g_flat)  # x becomes h = g * x: u_prev = x * scale, so h up to Adam's per-tensor scale
    if "param" in opts.levels and row_scale is not None:  # the param level needs h itself, element by element
        torch._foreach_mul_(x, torch.unbind(scale))
        row_scale = None
    sums.s = unit_sums(flat.row_sums(x_flat), row_scale)
    if "param" in opts.levels:
        rate_flat, rate = _param_rates_and_sums(job, x_flat, g_flat, sums)
    if opts.skip_nonfinite:  # the extremes are NaN or infinite iff an element is
        sums.finite = torch.stack(torch.aminmax(g_flat)).isfinite().all()

    coeffs = update_levels(job, sums)
    gate = coeffs.gate.to(dtype)
    torch._foreach_add_(steps, [gate] * len(steps))  # (the overload with one tensor reads it on the host)
    if "param" in opts.levels:
        kappa = _update_param_rates(job, rate_flat, rate, x_flat, x, coeffs)
    else:
        kappa = _unit_views(job, "kappa", coeffs.kappa_units)
    if opts.decoupled_weight_decay and opts.weight_decay > 0:
        torch._foreach_addcmul_(params, params, kappa, value=-opts.weight_decay)
    if opts.kind == "adam":
        _adam_apply(job, x_flat, x, g, kappa, coeffs.gate)
    else:
        _sgd_apply(job, g_flat, g, kappa, coeffs.gate, step_counts)


def _param_rates_and_sums(job: GroupJob, h_flat: torch.Tensor, g_flat: torch.Tensor,
                          sums: UnitSums) -> tuple[torch.Tensor, list]:
    """The param rates of all tensors copied into a flat buffer beside h's and g's (flat, and
    as per-tensor views), and into `sums` what the level stage needs from them when the
    param level is one of several: sum alpha_param_old * h and sum (alpha_param_old * g)^2.
    (The update needs a select and out= forms, which the _foreach_* operations lack; the
    flat copy costs one pass in and one out, both exact.)"""
    rate_flat, rate = _flat_views(job, "param_rate")
    torch._foreach_copy_(rate, _state_list(job, "param_rate"))
    if job.opts.multi_level:
        work, _ = _flat_views(job, "param_work")
        sums.param_dot = torch.mul(rate_flat, h_flat, out=work).sum()
        if job.opts.rule == "multiplicative":  # a squared norm reads work once (see _FlatLayout.row_squares)
            sums.param_sq = torch.linalg.vector_norm(torch.mul(rate_flat, g_flat, out=work)).square()
    return rate_flat, rate


def _update_param_rates(job: GroupJob, rate_flat: torch.Tensor, rate: list, h_flat: torch.Tensor, h: list,
                        coeffs: StepCoefficients) -> list:
    """`_update_param_rate` for all tensors at once, in the flat buffers: the new rates are
    selected where the rates move (so a skipped step's NaN h never reaches them, and they
    come back bit-identical) and copied back into the state; then the applied rates
    kappa_e = kappa_units[unit(e)] + param_kappa * alpha_param_new[e], returned as
    per-tensor views of a flat buffer. h (flat, and its per-tensor views) is overwritten."""
    opts, dtype = job.opts, rate_flat.dtype
    parents = None
    if "param" in opts.shrinkage:
        parent = coeffs.param_parent.to(dtype)
        parents = _unit_views(job, "param_parent", parent) if parent.dim() else [parent] * len(rate)
    new = _new_param_rates(h_flat, h, parents, rate_flat, coeffs, opts)
    torch.where(coeffs.hd_gate > 0, new, rate_flat, out=rate_flat)
    torch._foreach_copy_(_state_list(job, "param_rate"), rate)
    kappa_flat, kappa = _flat_views(job, "param_work")
    torch.mul(rate_flat, coeffs.param_kappa.to(dtype), out=kappa_flat)
    torch._foreach_add_(kappa, _unit_views(job, "kappa", coeffs.kappa_units))
    return kappa


def _adam_apply(job: GroupJob, scratch_flat: torch.Tensor, scratch: list, g: list, kappa: list,
                gate: torch.Tensor) -> None:
    """m, v (and vmax) moved and p - kappa * u, in three passes (the scratch zeroed, the
    kernel, the update of p): ATen's fused Adam kernel
    (torch._fused_adam_, the one torch.optim.Adam(fused=True) runs) moves the moments and
    writes -u into a zeroed scratch "parameter" (lr 1, no decay, no maximize: g already
    holds those), reading the step counts already advanced; then p += kappa * scratch. A
    skipped step passes found_inf = 1, on which the kernel returns before it reads
    anything (g may hold NaN), so the moments stay bit-identical; the scratch stays 0 and
    kappa is 0. Keeping this -u as the next step's u_prev would spare the reduction its five
    passes over m and v, but it differs in the last bit from the u_prev made from m and v,
    which an optimizer resumed from a state dict or copied must make: it would then leave
    the original's trajectory (tests/test_torch_optim_suite.py resumes bit for bit)."""
    opts = job.opts
    scratch_flat.zero_()
    scratch, g = _adam_kernel_operands(job, scratch, g)
    torch._fused_adam_(scratch, g, _state_list(job, "exp_avg"), _state_list(job, "exp_avg_sq"),
                       _state_list(job, "max_exp_avg_sq") if opts.amsgrad else [], _state_list(job, "step"),
                       lr=1.0, beta1=opts.beta1, beta2=opts.beta2, weight_decay=0.0, eps=opts.eps,
                       amsgrad=opts.amsgrad, maximize=False, found_inf=(1 - gate).to(torch.float32))
    torch._foreach_addcmul_(job.params, scratch, kappa)


def _adam_kernel_operands(job: GroupJob, scratch: list, g: list) -> tuple[list, list]:
    """The scratch and g as the fused Adam kernel must get them: with the moments' strides
    (it walks all its operands in storage order). Where the moments are contiguous those
    are the flat buffers' views; for a tensor whose moments are not (channels_last,
    transposed) the scratch is its own flat chunk viewed with the moments' strides, and g
    is copied into such a view of a second buffer. The views are made once per layout."""
    moments = _state_list(job, "exp_avg")
    odd = [i for i, m in enumerate(moments) if not m.is_contiguous()]
    if not odd:
        return scratch, g
    layout = tuple((i, moments[i].stride()) for i in odd)

    def make():
        _, strided_g = _flat_views(job, "strided_grad")
        views = {i: (scratch[i].as_strided(scratch[i].shape, stride), strided_g[i].as_strided(g[i].shape, stride))
                 for i, stride in layout}
        kernel_scratch = [views[i][0] if i in views else t for i, t in enumerate(scratch)]
        kernel_g = [views[i][1] if i in views else t for i, t in enumerate(g)]
        return kernel_scratch, kernel_g, [views[i][1] for i in odd], [g[i] for i in odd]

    key = ("adam_kernel_operands", layout, g[0].device, g[0].dtype)
    kernel_scratch, kernel_g, targets, sources = job.plan.cached(key, make)
    torch._foreach_copy_(targets, sources)
    return kernel_scratch, kernel_g


def _sgd_apply(job: GroupJob, g_flat: torch.Tensor, g: list, kappa: list, gate: torch.Tensor,
               step_counts: torch.Tensor) -> None:
    """The momentum buffer, the stored direction and p - kappa * u. A skipped step sees
    g = 0: then every update below is exactly the identity (kappa is 0, a buffer is scaled
    by 1 and gets 0 added, a stored direction is lerped with weight 0), without a select on
    the state. With the guard a step that proceeds has finite g, so g * gate with NaN
    (0 * inf) made 0 is that select, in two vectorised passes that cost 0.6 of one `where`
    with a 0-d condition."""
    opts, dtype = job.opts, g_flat.dtype
    proceeds = gate > 0
    gate = gate.to(dtype)
    if opts.skip_nonfinite:
        g_flat.mul_(gate).nan_to_num_(0.0, 0.0, 0.0)
    elif job.found_inf is not None:  # no guard: NaN in a step that proceeds must reach p
        g_flat.masked_fill_(~proceeds, 0)
    u = g
    if opts.momentum != 0:
        # buf = g at the parameter's first step: buf is still zero then, so only g's factor changes
        bufs = _state_list(job, "momentum_buffer")
        torch._foreach_mul_(bufs, torch.full_like(gate, opts.momentum).where(proceeds, 1.0))
        torch._foreach_addcmul_(bufs, g, torch.unbind(1 - opts.dampening * (step_counts != 0).to(dtype)))
        u = bufs
        if opts.nesterov:
            _, u = _flat_views(job, "direction")
            torch._foreach_copy_(u, g)
            torch._foreach_add_(u, bufs, alpha=opts.momentum)
    if opts.stores_direction:  # weight 1 gives u exactly, weight 0 the old direction
        torch._foreach_lerp_(_state_list(job, "prev_direction"), u, [gate] * len(u))
    torch._foreach_addcmul_(job.params, u, kappa, value=-1)
