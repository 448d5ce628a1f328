"""The Triton backend: SPEC section 2 for all tensors of a param group in a fixed number of
launches, whatever the number of tensors.

A step is the three stages of every fast backend (see `multilevel_hd.levels`):
1. `reduce_kernel` (one launch per bucket: the tensors of one dtype, strided layouts apart)
   and `finish_kernel` (one launch): the per-unit sums S (Qg, Qu), the param-level partials,
   the device-side non-finite flag, and the per-parameter step counts (moved by the gate);
2. the shared level stage `update_levels` (torch operations on the per-unit arrays);
3. `step_kernel` (one launch per bucket): the fused elementwise pass.
So a float32 model takes 3 Triton launches per step (`launches_last_step`; the level
stage's torch operations are not counted), whatever its number of tensors. Nothing reads
a device value on the host. Kernels and their tables live in `multilevel_hd.kernels` and
`triton_tables`.

Runs on CUDA, and on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set before
the kernels are first imported), which is how the test suite covers it without a GPU.
float64 groups, and groups whose tensors the flat tables cannot address, step with the
torch backend (a warning says so once).
"""
from __future__ import annotations

import contextlib
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
        coeffs = update_levels(job, sums)
        launches_last_step = launches + _apply(job, tables, coeffs)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _common_switches(job: GroupJob, tables, bucket) -> dict:
    """Constexpr switches shared by the reduction and the step kernel."""
    opts = job.opts
    return dict(
        P_DTYPE=tables_module.TL_DTYPES[bucket.dtype],
        KIND=tables_module.common.ADAM.value if opts.kind == "adam" else tables_module.common.SGD.value,
        MAXIMIZE=opts.maximize,
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
    if need_sums or opts.skip_nonfinite:
        for bucket in tables.buckets:
            k.reduce_kernel[(bucket.n_reduce,)](
                bucket.reduce_chunks, bucket.n_reduce, bucket.chunk_base, tables.pointers, tables.meta,
                tables.n, tables.sums, tables.sums.stride(0), tables.partials, tables.partials.shape[1],
                opts.weight_decay, _log(opts.beta1), _log(opts.beta2), opts.eps,
                **_common_switches(job, tables, bucket),
                NEED_SUMS=need_sums, PARAM_SUMS=param_sums, num_warps=k.REDUCE_WARPS,
            )
            launches += 1
    n_long = tables.long_units.shape[1]
    k.finish_kernel[(triton.cdiv(n_long, k.FINISH_UNITS.value) + 1,)](
        tables.long_units, n_long, tables.max_pieces, tables.sums, tables.sums.stride(0),
        tables.partials, tables.partials.shape[1], tables.pointers, tables.n, tables.finite,
        tables.param_sums, tables.old_steps, MULTIPLICATIVE=multiplicative, PARAM_SUMS=param_sums,
        SKIP_NONFINITE=opts.skip_nonfinite,
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
    for bucket in tables.buckets:
        tables_module.step.step_kernel[(bucket.n_step,)](
            bucket.step_chunks, bucket.n_step, tables.pointers, tables.meta, tables.n, tables.old_steps,
            coeffs.gate, coeffs.hd_gate, kappa, kappa_stride, param_kappa, param_hd, parent, parent_stride,
            opts.weight_decay, opts.beta1, opts.beta2, _log(opts.beta1), _log(opts.beta2), opts.eps,
            opts.momentum, opts.dampening, opts.shrinkage.get("param", 0.0),
            0.0 if lo is None else lo, 0.0 if hi is None else hi,
            **_common_switches(job, tables, bucket),
            MOMENTUM=opts.momentum != 0, NESTEROV=opts.nesterov,
            DECOUPLED_WD=opts.decoupled_weight_decay and opts.weight_decay > 0,
            HAS_PARAM=has_param, SHRINK=shrink, CLAMP_LO=lo is not None, CLAMP_HI=hi is not None,
            PER_UNIT=kappa_stride != 0 or parent_stride != 0, num_warps=tables_module.step.STEP_WARPS,
        )
    return len(tables.buckets)
