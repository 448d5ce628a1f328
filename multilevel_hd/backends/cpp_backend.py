"""The compiled backend: "cpp" for CPU tensors, "cuda" (cuda_backend.py) for CUDA tensors (and
for CPU tensors through the CUDA kernels emulated on the CPU, MLHD_CUDA_ON_CPU=1).

A step is the three stages of every fast backend, as compiled ops (csrc/):
`torch.ops.multilevel_hd.reduce` (one pass over the elements: per-unit sums of g*u_prev,
the param-level totals and the non-finite flag), `torch.ops.multilevel_hd.levels` (the
level stage, `level_stage`; a sharded group runs the shared torch stage
`multilevel_hd.levels.update_levels` instead), and `torch.ops.multilevel_hd.apply` (one pass:
param-level rates, base direction and state, the parameter update). Nothing is read back
to the host; the apply op itself skips a step whose gate is 0. Under torch.amp.GradScaler
both ops multiply each raw gradient by `job.grad_factor` (a device scalar: sign / scale) as
they read it, so the gradients are never unscaled in a pass of their own.

The ops walk a launch table built once per plan (`_launch_table`): rows cut into
segments, segments grouped into chunks of about `chunk` elements. The per-device sizes
trade parallelism against table size; they do not change any result on a given device.
Parameters of one group that differ in dtype run as separate buckets (one op call each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hierarchy import LEVELS
from ..levels import StepCoefficients, UnitSums, update_levels
from ..state import GroupJob, compute_dtype
from . import _extension

name = "cpp"

# (elements per chunk, elements per segment, segments per chunk), each at most: a CPU thread
# takes whole chunks and sums each segment in vector lanes; a CUDA block takes a chunk and
# its 8 warps one segment at a time, so tensors of short rows get more, smaller blocks.
# (Rows of one element are not cut into segments: both devices walk them as plain arrays.)
_CHUNKING = {"cpu": (16384, 16384, 16384), "cuda": (16384, 2048, 64)}
_PTR_FIELDS = 7  # pointers per tensor in the ops' pointer table (kPtrFields, csrc/common.h)


def unavailable_reason(device):
    device = torch.device(device)
    if device.type != "cpu":
        return f"backend 'cpp' runs on CPU tensors, not {device.type} ones" + (
            "; use 'cuda'" if device.type == "cuda" else "")
    return _extension.load_error()


@dataclass
class _Bucket:
    """The parameters of one dtype in a step, and their launch tables."""

    index: list | None  # positions in the job's lists; None: all of them
    math: torch.dtype
    meta: torch.Tensor  # int64 launch table on the device (csrc/common.h)
    num_slots: int
    # per op (reduce, apply): the host copy of its pointer table, which the op compares
    # against, and the table on the device. Two tables, because a tensor the kernels walk
    # through a staged copy (ops.cpp) has another copy in each op: one shared table would
    # be uploaded twice in every step.
    ptr_mirrors: tuple[torch.Tensor, torch.Tensor]
    ptr_tables: tuple[torch.Tensor, torch.Tensor]


def _launch_table(layouts, device, geometry: str) -> tuple[torch.Tensor, int]:
    """The ops' int64 table of tensors and chunks (layout: csrc/common.h) for the kernels of
    `geometry` ("cpu" or "cuda", whatever device runs them), and its slot count."""
    chunk, seg, max_segs = _CHUNKING[geometry]
    tensors, chunks, slots = [], [], 0
    for i, lay in enumerate(layouts):
        per_row = -(-lay.row_len // seg)
        seg_len = -(-lay.row_len // per_row)
        num_segs = lay.units * per_row
        per_chunk = chunk if lay.row_len == 1 else max(1, min(chunk // seg_len, max_segs))
        tensors += [lay.units, lay.row_len, per_row, seg_len, lay.unit_offset, slots]
        for s in range(0, num_segs, per_chunk):
            chunks += [i, s, min(s + per_chunk, num_segs)]
        slots += num_segs
    meta = torch.tensor(tensors + chunks, dtype=torch.int64)
    # built once per plan, and even then the host does not wait for the upload
    return (meta if device.type == "cpu" else meta.pin_memory().to(device, non_blocking=True)), slots


def _buckets(job: GroupJob, device, geometry: str) -> list[_Bucket]:
    dtypes = tuple(p.dtype for p in job.params)

    def make():
        layouts, out = job.plan.active_layouts, []
        for dtype in dict.fromkeys(dtypes):
            index = [i for i, d in enumerate(dtypes) if d == dtype]
            meta, num_slots = _launch_table([layouts[i] for i in index], device, geometry)
            ptrs = len(index) * _PTR_FIELDS
            out.append(_Bucket(None if len(index) == len(dtypes) else index, compute_dtype(dtype), meta, num_slots,
                               tuple(torch.zeros(ptrs, dtype=torch.int64) for _ in range(2)),
                               tuple(torch.zeros(ptrs, dtype=torch.int64, device=device) for _ in range(2))))
        return out

    return job.plan.cached(("fused", device, geometry, dtypes), make)


def _pick(items: list, index):
    """The bucket's part of a per-tensor list; an empty list (a state the configuration does
    not keep) stays empty."""
    return items if index is None or not items else [items[i] for i in index]


def _as(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


# The coefficient buffer of the levels op (csrc/levels.h, CoefField): these scalars, then
# kappa per unit, then the param level's shrinkage target per unit.
_GATE, _HD_GATE, _PARAM_KAPPA, _PARAM_HD, _COEF_SCALARS = range(5)
_LEVEL_CODES = {None: -1, **{level: i for i, level in enumerate(LEVELS)}}  # csrc/levels.h, Level


def level_stage(job: GroupJob, sums: UnitSums, ops=torch.ops.multilevel_hd) -> StepCoefficients:
    """Stage 2 as one op (`ops.levels`): what `update_levels(job, sums)` computes, the group
    state updated in place; not for a sharded group."""
    opts, plan, gs = job.opts, job.plan, job.group_state
    device, acc = gs["weights"].device, gs["weights"].dtype
    multiplicative = opts.rule == "multiplicative"
    beta = [float(opts.hypergrad_lr.get(level, 0.0)) for level in LEVELS]
    if not multiplicative and opts.scaling == "size":
        beta[3] *= plan.num_elements  # the param level's N / N_param
    lo, hi = opts.rate_bounds if opts.rate_bounds is not None else (None, None)
    lr_scale = opts.lr_scale  # a float, or a 0-d device tensor under torch.compile
    if isinstance(lr_scale, torch.Tensor):
        lr_scale = lr_scale.to(acc)
    else:  # made on the device: a fill, not a host-to-device copy that would wait for the GPU
        lr_scale = torch.full((), lr_scale, dtype=acc, device=device)
    found_inf = None if job.found_inf is None else job.found_inf.to(device=device, dtype=acc)
    param_sums = "param" in opts.levels and opts.multi_level
    coef, gate, hd_gate, kappa_units, param_kappa, param_hd, parent_units, parent_global = plan.cached(
        ("levels_coef", device, acc), lambda: _coefficient_views(plan.layout.num_units, acc, device))
    ops.levels(
        sums.s, sums.qg, sums.qu, sums.param_dot if param_sums else None, sums.param_sq if param_sums else None,
        sums.finite if opts.skip_nonfinite else None, found_inf, lr_scale, plan.first_units(device),
        plan.size_scale("unit", device, acc), plan.size_scale("layer", device, acc), plan.unit_mask(device, acc),
        plan.layer_mask(device, acc), gs["step"], gs["skipped"], gs["lr_scale"], gs["weights"],
        gs.get("rate_global"), gs.get("rate_layer"), gs.get("rate_unit"), gs["applied_scale"], gs["applied_offset"],
        coef, [opts.levels.index(lv) if lv in opts.levels else -1 for lv in LEVELS],
        [_LEVEL_CODES[opts.parents[lv] if lv in opts.shrinkage else None] for lv in LEVELS], beta,
        [float(opts.shrinkage.get(lv, 0.0)) for lv in LEVELS], opts.combination_lr, opts.hd_decay, opts.final_lr,
        -math.inf if lo is None else lo, math.inf if hi is None else hi, multiplicative, opts.scaling == "size",
    )
    coeffs = StepCoefficients(gate=gate, hd_gate=hd_gate, kappa_units=kappa_units)
    if "param" in opts.levels:
        coeffs.param_kappa, coeffs.param_hd = param_kappa, param_hd
        if "param" in opts.shrinkage:  # (a global parent: one value, 0-d as the torch stage gives it)
            coeffs.param_parent = parent_global if opts.parents["param"] == "global" else parent_units
    return coeffs


def _coefficient_views(units: int, dtype, device) -> tuple:
    """The levels op's coefficient buffer, made once per plan (every step's op writes what that
    step's apply reads), and the views of its fields: each view is an op call, which after
    the passes over the parameters costs tens of microseconds with cold caches."""
    coef = torch.empty(_COEF_SCALARS + 2 * units, dtype=dtype, device=device)
    parent_units = coef[_COEF_SCALARS + units :]
    return (coef, coef[_GATE], coef[_HD_GATE], coef[_COEF_SCALARS : _COEF_SCALARS + units], coef[_PARAM_KAPPA],
            coef[_PARAM_HD], parent_units, parent_units[0])


def _sum_views(rows: int, units: int, dtype, device) -> tuple:
    """The reduce op's outputs in one buffer made once per plan, which a step zeroes in one
    call, and the views the level stage reads (views cost op calls: `_coefficient_views`):
    the buffer; unit sums [rows, units] and totals [3] (the op's outputs); the rows s, qg, qu
    (qg, qu None for one row); the totals param dot, param sq, non-finite; and the 0-d bool
    that `finite` is written into."""
    buffer = torch.zeros(rows * units + 3, dtype=dtype, device=device)
    unit_sums, totals = buffer[: rows * units].view(rows, units), buffer[rows * units :]
    row_views = (unit_sums[0], unit_sums[1], unit_sums[2]) if rows == 3 else (unit_sums[0], None, None)
    return (buffer, unit_sums, totals, row_views, (totals[0], totals[1], totals[2]),
            torch.ones((), dtype=torch.bool, device=device))


def step(job: GroupJob) -> None:
    device = job.group_state["weights"].device
    run_step(job, torch.ops.multilevel_hd, device.type)


def run_step(job: GroupJob, ops, geometry: str) -> None:
    """One step through the three compiled ops of `ops` (an op namespace: the real library's,
    or the emulation's), with the launch tables of `geometry`'s kernels."""
    opts, plan, gs = job.opts, job.plan, job.group_state
    acc, device = gs["weights"].dtype, gs["weights"].device
    multiplicative = opts.rule == "multiplicative"
    hypergrad_sums = opts.multi_level or "param" not in opts.levels  # else nothing needs S
    param_level = "param" in opts.levels
    states = job.states
    state_c = [st["max_exp_avg_sq"] for st in states] if opts.amsgrad else []
    if opts.kind == "adam":
        direction = "amsgrad" if opts.amsgrad else "adam"
        state_a, state_b = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
    else:
        direction = "sgd" if opts.momentum == 0 else "nesterov" if opts.nesterov else "momentum"
        state_a = [st["momentum_buffer"] for st in states] if opts.momentum != 0 else []
        state_b = [st["prev_direction"] for st in states] if opts.stores_direction else []
    rates = [st["param_rate"] for st in states] if param_level else []
    steps = [st["step"] for st in states]
    coupled = 0.0 if opts.decoupled_weight_decay else opts.weight_decay
    decoupled = opts.weight_decay if opts.decoupled_weight_decay else 0.0

    buckets = _buckets(job, device, geometry)
    lists = [[_pick(x, b.index) for x in (job.params, job.grads, state_a, state_b, state_c, rates, steps)]
             for b in buckets]
    # (-1 if maximize) / GradScaler's scale, in each bucket's math dtype: both passes multiply
    # the raw gradient by it as they read it
    factors = {dtype: job.grad_factor(dtype) for dtype in dict.fromkeys(b.math for b in buckets)}

    rows = 3 if multiplicative else 1
    sum_buffer, unit_sums, totals, (s, qg, qu), (param_dot, param_sq, nonfinite), finite = plan.cached(
        ("reduce_sums", device, acc, rows), lambda: _sum_views(rows, plan.layout.num_units, acc, device))
    sum_buffer.zero_()
    if hypergrad_sums or opts.skip_nonfinite:
        for b, args in zip(buckets, lists):
            # a float32 bucket of a float64 group sums in float32 into its own buffers
            own = b.math != acc
            b_sums = torch.zeros_like(unit_sums, dtype=b.math) if own else unit_sums
            b_totals = torch.zeros_like(totals, dtype=b.math) if own else totals
            ops.reduce(*args, b.meta, b.ptr_mirrors[0], b.ptr_tables[0], b.num_slots, direction, hypergrad_sums,
                       param_level and opts.multi_level, factors[b.math], coupled, opts.beta1, opts.beta2, opts.eps,
                       b_sums, b_totals)
            if own:
                unit_sums += b_sums
                totals += b_totals
    sums = UnitSums(s=s, qg=qg, qu=qu)
    if param_level and opts.multi_level:
        sums.param_dot, sums.param_sq = param_dot, param_sq
    if opts.skip_nonfinite:
        sums.finite = torch.eq(nonfinite, 0, out=finite)

    # a sharded group all-reduces its totals midway through the stage (levels._group_totals)
    c = update_levels(job, sums) if job.sharding_group is not None else level_stage(job, sums, ops)

    lo, hi = opts.rate_bounds if opts.rate_bounds is not None else (None, None)
    for b, args in zip(buckets, lists):
        ops.apply(*args, b.meta, b.ptr_mirrors[1], b.ptr_tables[1], direction, factors[b.math], coupled, decoupled,
                  opts.beta1, opts.beta2, opts.eps, opts.momentum, opts.dampening, _as(c.gate, b.math),
                  _as(c.hd_gate, b.math), _as(c.kappa_units, b.math), _as(c.param_kappa, b.math),
                  _as(c.param_hd, b.math), _as(c.param_parent, b.math), multiplicative,
                  opts.shrinkage.get("param", 0.0), -math.inf if lo is None else lo, math.inf if hi is None else hi)
