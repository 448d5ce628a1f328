"""The Triton backend: docs/algorithm.md section 2 for all tensors of a param group in a fixed number of
launches, whatever the number of tensors.

A step is the three stages of every fast backend (see `multilevel_hd.levels`):
1. `reduce_kernel` (one launch per bucket: the tensors of one dtype, strided layouts apart)
   and `finish_kernel` (one launch): the per-unit sums S (Qg, Qu), the param-level partials,
   the device-side non-finite flag, and the per-parameter step counts (moved by the gate);
2. the level stage in two launches (`level_stage`: `level_sums_kernel`, the layers' sums,
   then `level_update_kernel`), computing exactly what the shared torch stage
   `multilevel_hd.levels.update_levels` computes;
3. `step_kernel` (one launch per bucket): the fused elementwise pass.
So a float32 model takes 5 Triton launches per step (`launches_last_step`), whatever its
number of tensors. Nothing reads a device value on the host. Kernels and their tables
live in `multilevel_hd.kernels`, `triton_tables` and the plan's cache (`_LevelTables`).

Runs on CUDA, and on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set before
the kernels are first imported), which is how the test suite covers it without a GPU.
float64 groups, and groups whose tensors the flat tables cannot address, step with the
torch backend (a warning says so once).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import warnings

import torch

from ..levels import StepCoefficients, UnitSums, update_levels
from ..state import GroupJob
from . import torch_backend

try:
    import triton

    from . import triton_tables as tables_module

    level_kernels = importlib.import_module("multilevel_hd.kernels.level_stage")  # after triton_tables
except ImportError as err:  # triton is optional: the backend then reports itself unavailable
    tables_module, _IMPORT_ERROR = None, err

name = "triton"
launches_last_step = 0  # Triton launches of the last group step (0 when it fell back to torch)
_warned: set = set()


def unavailable_reason(device):
    if tables_module is None:
        return f"Triton cannot be imported ({_IMPORT_ERROR}); install it with `pip install triton`"
    interpreted = not isinstance(tables_module.step.step_kernel, triton.runtime.JITFunction)
    if device.type == "cuda":
        if interpreted:
            return "TRITON_INTERPRET=1 runs the kernels on the CPU; unset it to run them on CUDA"
        return None
    if device.type == "cpu":
        if interpreted and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            "the Triton kernels run on CUDA devices; on the CPU only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing multilevel_hd)"
        )
    return f"the Triton kernels do not run on {device.type} devices"


def step(job: GroupJob) -> None:
    global launches_last_step
    device = job.params[0].device
    if job.group_state["weights"].dtype == torch.float64:
        reason = "float64 parameters"
    elif job.sharding_group is not None:
        # finish_kernel moves the per-parameter step counts by this rank's own non-finite
        # flag, but a sharded group's gate comes from the all-reduce after it
        reason = "a sharded param group (sharding_group)"
    else:  # the plan's tables, pointed at this step's tensors
        tables = job.plan.cached(("triton", device), lambda: tables_module.GroupTables(job.plan, device))
        reason = tables.bind(job, tables_module.state_keys(job.opts))
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"multilevel_hd triton backend: {reason}; such groups step with the torch backend")
        launches_last_step = 0
        torch_backend.step(job)
        return
    # Triton launches on the current device; the group's may be another GPU.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        sums, launches = _reduce(job, tables)
        if not isinstance(job.opts.lr_scale, torch.Tensor):
            coeffs = level_stage(job, sums)
            launches += LEVEL_STAGE_LAUNCHES
        else:  # under torch.compile lr_scale is a 0-d tensor, not a kernel scalar
            coeffs = update_levels(job, sums)
        launches_last_step = launches + _apply(job, tables, coeffs)


LEVEL_STAGE_LAUNCHES = 2


def _block(n: int) -> int:
    return min(level_kernels.MAX_BLOCK, max(16, triton.next_power_of_2(max(n, 1))))


class _LevelTables:
    """The level stage's per-plan tables (uploaded once per plan) and its scratch buffer,
    reused by every step: steps on two streams must be ordered (see triton_tables)."""

    def __init__(self, plan, device):
        layers, f32 = plan.layout.tensors, torch.float32
        self.num_layers, self.num_units = plan.layout.num_layers, plan.layout.num_units
        self.layer_table = torch.tensor(  # int32 [2, layers]: first unit, number of units
            [[t.unit_offset for t in layers], [t.units for t in layers]], dtype=torch.int32
        ).to(device)
        self.layer_of_unit = plan.layer_of_unit(device).to(torch.int32)
        self.unit_mask, self.layer_mask = plan.unit_mask(device, f32), plan.layer_mask(device, f32)
        self.unit_scale = plan.size_scale("unit", device, f32)
        self.layer_scale = plan.size_scale("layer", device, f32)
        self.max_units = max(t.units for t in layers)
        self.sums_block = _block(self.max_units)  # level_sums_kernel: [sums_layers, sums_block] tiles
        self.sums_layers = min(level_kernels.SUMS_TILE // self.sums_block, triton.next_power_of_2(self.num_layers))
        self.unit_block, self.layer_block = _block(self.num_units), _block(self.num_layers)
        self.grid = max(triton.cdiv(self.num_units, self.unit_block),  # level_update_kernel
                        triton.cdiv(self.num_layers, self.layer_block))
        rows = level_kernels.SCRATCH_ROWS.value * self.num_layers + level_kernels.SNAP_SIZE.value
        self.scratch = torch.zeros(rows, dtype=f32, device=device)


def level_stage(job: GroupJob, sums: UnitSums) -> StepCoefficients:
    """Stage 2 in LEVEL_STAGE_LAUNCHES launches (`multilevel_hd.kernels.level_stage`): exactly
    what `update_levels(job, sums)` computes, the group state updated in place, float32 state.
    Not for a sharded group (those step with the torch backend): its totals are all-reduced
    midway (`levels._group_totals`).
    The coefficients live in one fresh buffer per step."""
    opts, plan, gs = job.opts, job.plan, job.group_state
    device, k = gs["weights"].device, level_kernels
    lt = plan.cached(("triton_levels", device), lambda: _LevelTables(plan, device))
    index = {level: i for i, level in enumerate(opts.levels)}
    kg, kl, ku, kp = (index.get(level, -1) for level in ("global", "layer", "unit", "param"))
    multiplicative = opts.rule == "multiplicative"
    lo, hi = opts.rate_bounds if opts.rate_bounds is not None else (None, None)
    beta = {level: float(opts.hypergrad_lr.get(level, 0.0)) for level in ("global", "layer", "unit", "param")}
    param_beta = beta["param"]
    if not multiplicative and opts.scaling == "size":
        param_beta *= plan.num_elements
    rho_l, rho_u = opts.shrinkage.get("layer", 0.0), opts.shrinkage.get("unit", 0.0)
    parent = opts.parents["param"] if "param" in opts.shrinkage else None
    units, first = lt.num_units, k.OUT_UNITS.value  # the coefficients: scalars, then per unit
    out = torch.empty(first + 2 * units, dtype=torch.float32, device=device)
    # Arguments a switch turns off get any device tensor (out); they are never read.
    s = sums.s
    qg, qu = (sums.qg, sums.qu) if multiplicative else (s, s)
    rates = [gs.get(key, out) for key in ("rate_global", "rate_layer", "rate_unit")]
    levels = dict(K=len(opts.levels), KG=kg, KL=kl, KU=ku)
    k.level_sums_kernel[(triton.cdiv(lt.num_layers, lt.sums_layers),)](
        s, qg, qu, rates[2], lt.layer_table, lt.num_layers, lt.scratch,
        gs["step"], gs["lr_scale"], gs["weights"], rates[0], rates[1],
        **levels, MULTIPLICATIVE=multiplicative, LAYERS=lt.sums_layers, BLOCK=lt.sums_block,
        num_warps=k.LEVEL_WARPS,
    )
    found_inf = out if job.found_inf is None else job.found_inf.to(device=device, dtype=torch.float32)
    param_sums = (sums.param_dot, sums.param_sq) if kp >= 0 and opts.multi_level else (out, out)
    k.level_update_kernel[(lt.grid,)](
        s, qg, qu, param_sums[0], param_sums[1] if multiplicative else out,
        sums.finite.view(torch.uint8) if opts.skip_nonfinite else out, found_inf,
        lt.scratch, lt.num_layers, units, lt.layer_of_unit, lt.unit_scale, lt.layer_scale,
        lt.unit_mask, lt.layer_mask, gs["step"], gs["skipped"], gs["lr_scale"], gs["weights"], *rates,
        gs["applied_scale"], gs["applied_offset"], out,
        beta["global"], beta["layer"], beta["unit"], param_beta, rho_l, rho_u,
        opts.combination_lr, opts.hd_decay, opts.lr_scale, opts.final_lr,
        0.0 if lo is None else float(lo), 0.0 if hi is None else float(hi),
        **levels, KP=kp, MULTIPLICATIVE=multiplicative, SIZED=opts.scaling == "size",
        SKIP_NONFINITE=opts.skip_nonfinite, HAS_FOUND_INF=job.found_inf is not None,
        SHRINK_LAYER=rho_l > 0, SHRINK_UNIT=rho_u > 0, RHO_L_SMALL=rho_l < 0.5, RHO_U_SMALL=rho_u < 0.5,
        PARAM_PARENT={None: 0, "global": 1, "layer": 2, "unit": 3}[parent],
        CLAMP_LO=lo is not None, CLAMP_HI=hi is not None,
        UNIT_BLOCK=lt.unit_block, LAYER_BLOCK=lt.layer_block, num_warps=k.LEVEL_WARPS,
    )
    per_unit = kl >= 0 or ku >= 0
    kappa = out[first : first + units] if per_unit else out[k.OUT_KAPPA.value].expand(units)
    coeffs = StepCoefficients(gate=out[k.OUT_GATE.value], hd_gate=out[k.OUT_HD_GATE.value], kappa_units=kappa)
    if kp >= 0:
        coeffs.param_kappa, coeffs.param_hd = out[k.OUT_PARAM_KAPPA.value], out[k.OUT_PARAM_HD.value]
        if parent == "global":
            coeffs.param_parent = out[k.OUT_PARENT.value]
        elif parent is not None:
            coeffs.param_parent = out[first + units :]
    return coeffs


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _common_switches(job: GroupJob, tables, bucket) -> dict:
    """Constexpr switches shared by the reduction and the step kernel."""
    opts = job.opts
    return dict(
        P_DTYPE=tables_module.TL_DTYPES[bucket.dtype],
        KIND=tables_module.common.ADAM.value if opts.kind == "adam" else tables_module.common.SGD.value,
        COUPLED_WD=opts.weight_decay > 0 and not opts.decoupled_weight_decay,
        SKIP_NONFINITE=opts.skip_nonfinite,
        MULTIPLICATIVE=opts.rule == "multiplicative",
        STRIDED=bucket.strided,
        ALIGNED=tables.aligned,
    )


def _reduce(job: GroupJob, tables) -> tuple[UnitSums, int]:
    """Stage 1: the reduction and finishing launches; returns the sums and the launch count."""
    opts, k = job.opts, tables_module.reduce
    multiplicative = opts.rule == "multiplicative"
    coarse = any(level != "param" for level in opts.levels)
    need_sums = coarse or opts.multi_level  # the param level alone needs no sums
    param_sums = "param" in opts.levels and opts.multi_level  # the weights' G_param, R_param
    launches = 0
    # (-1 if maximize) / GradScaler's scale: the kernels unscale g as they read it
    grad_factor = job.grad_factor(torch.float32)
    if need_sums or opts.skip_nonfinite:
        for bucket in tables.buckets:
            k.reduce_kernel[(bucket.n_reduce,)](
                bucket.reduce_chunks, bucket.n_reduce, bucket.chunk_base, tables.pointers, tables.meta,
                tables.n, tables.sums, tables.sums.stride(0), tables.partials, tables.partials.shape[1],
                grad_factor, opts.weight_decay, _log(opts.beta1), _log(opts.beta2), opts.eps,
                **_common_switches(job, tables, bucket),
                NEED_SUMS=need_sums, PARAM_SUMS=param_sums, num_warps=k.REDUCE_WARPS,
            )
            launches += 1
    n_long = tables.long_units.shape[1]
    # GradScaler's found_inf holds the step counts too (any device tensor when there is none)
    found_inf = tables.finite if job.found_inf is None else job.found_inf.to(tables.sums.device, torch.float32)
    k.finish_kernel[(triton.cdiv(n_long, k.FINISH_UNITS.value) + 1,)](
        tables.long_units, n_long, tables.max_pieces, tables.sums, tables.sums.stride(0),
        tables.partials, tables.partials.shape[1], tables.pointers, tables.n, tables.finite,
        tables.param_sums, tables.old_steps, found_inf, MULTIPLICATIVE=multiplicative, PARAM_SUMS=param_sums,
        SKIP_NONFINITE=opts.skip_nonfinite, HAS_FOUND_INF=job.found_inf is not None,
    )
    sums = UnitSums(s=tables.sums[0, : tables.num_units], finite=tables.finite.view(torch.bool))
    if multiplicative:
        sums.qg, sums.qu = tables.sums[1, : tables.num_units], tables.sums[2, : tables.num_units]
    if param_sums:
        sums.param_dot, sums.param_sq = tables.param_sums[0], tables.param_sums[1]
    return sums, launches + 1


def _apply(job: GroupJob, tables, coeffs: StepCoefficients) -> int:
    """Stage 3: the step launches; returns their count."""
    opts = job.opts
    has_param = "param" in opts.levels
    shrink = has_param and "param" in opts.shrinkage
    lo, hi = opts.rate_bounds if opts.rate_bounds is not None else (None, None)
    # Per-unit arrays or broadcast scalars: a stride 0 reads one value for every unit.
    # Arguments a switch turns off get any device tensor (coeffs.gate); they are never read.
    kappa, parent = coeffs.kappa_units, coeffs.param_parent if shrink else coeffs.gate
    kappa_stride = kappa.stride(0) if kappa.dim() else 0
    parent_stride = parent.stride(0) if parent.dim() else 0
    param_kappa = coeffs.param_kappa if has_param else coeffs.gate
    param_hd = coeffs.param_hd if has_param else coeffs.gate
    grad_factor = job.grad_factor(torch.float32)  # the reduction's
    for bucket in tables.buckets:
        tables_module.step.step_kernel[(bucket.n_step,)](
            bucket.step_chunks, bucket.n_step, tables.pointers, tables.meta, tables.n, tables.old_steps,
            coeffs.gate, grad_factor, coeffs.hd_gate, kappa, kappa_stride, param_kappa, param_hd, parent,
            parent_stride,
            opts.weight_decay, opts.beta1, opts.beta2, _log(opts.beta1), _log(opts.beta2), opts.eps,
            opts.momentum, opts.dampening, opts.shrinkage.get("param", 0.0),
            0.0 if lo is None else float(lo), 0.0 if hi is None else float(hi),  # float32, also for ints
            **_common_switches(job, tables, bucket),
            AMSGRAD=opts.amsgrad, MOMENTUM=opts.momentum != 0, NESTEROV=opts.nesterov,
            DECOUPLED_WD=opts.decoupled_weight_decay and opts.weight_decay > 0,
            HAS_PARAM=has_param, SHRINK=shrink, CLAMP_LO=lo is not None, CLAMP_HI=hi is not None,
            PER_UNIT=kappa_stride != 0 or parent_stride != 0, num_warps=tables_module.step.STEP_WARPS,
        )
    return len(tables.buckets)
