"""Stage 3 of a step: the fused elementwise pass (docs/algorithm.md steps 4 for the param level, 5-7).

One program per chunk of BLOCK elements of one tensor (the chunk table lists them all, so
one launch covers every tensor of a dtype). Each element is read once and written once:
g, p and the base state in, p and the base state out, plus the param level's rate. The
coarse rates arrive as kappa_units (per unit, the gate already folded in); the param level
is HD-updated here because it has one rate per element.

A skipped step (gate 0) returns before any load or store, so every tensor stays
bit-identical. Chunks follow memory order; an element's unit comes from its offset (see
`common`). Full chunks take an unmasked path so that the compiler may use 16-byte
accesses; only a tensor's last chunk is masked by its length.
"""
import triton
import triton.language as tl

from .common import (
    ADAM, ROLE_STATE3, adam_direction, bias_correction, effective_grad, load_grad_factor, tensor_meta,
    tensor_pointers, to_dtype,
)

BLOCK = tl.constexpr(2048)
STEP_WARPS = 4
# Rows of the chunk table (int64 [CHUNK_COLS, n_chunks]).
CHUNK_TENSOR, CHUNK_START = tl.constexpr(0), tl.constexpr(1)
CHUNK_COLS = 2


@triton.jit
def _step_block(
    tensor, start, numel, units, unit_offset, unit_stride, pointers, n_tensors, old_steps, grad_factor,
    hd_gate_ptr, kappa_units, kappa_stride, param_kappa_ptr, param_hd_ptr, parent_ptr, parent_stride,
    weight_decay, beta1, beta2, log_beta1, log_beta2, eps, momentum, dampening, shrink, lo, hi,
    P_DTYPE: tl.constexpr, KIND: tl.constexpr, AMSGRAD: tl.constexpr, MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, COUPLED_WD: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
    DECOUPLED_WD: tl.constexpr, HAS_PARAM: tl.constexpr, MULTIPLICATIVE: tl.constexpr,
    SHRINK: tl.constexpr, CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr, PER_UNIT: tl.constexpr,
    STRIDED: tl.constexpr, ALIGNED: tl.constexpr, FULL: tl.constexpr,
):
    idx = tl.arange(0, BLOCK)
    offs = start + idx
    mask = None
    other = None
    if not FULL:
        mask = offs < numel
        other = 0.0
    p_ptr, g_ptr, s1_ptr, s2_ptr, rate_ptr = tensor_pointers(pointers, tensor, n_tensors, P_DTYPE, ALIGNED)
    p_ptr, s1_ptr, s2_ptr, rate_ptr = p_ptr + offs, s1_ptr + offs, s2_ptr + offs, rate_ptr + offs
    p = tl.load(p_ptr, mask=mask, other=other).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=other)
    g, _ = effective_grad(g.to(tl.float32), p, grad_factor, weight_decay, COUPLED_WD, SKIP_NONFINITE)
    old_step = tl.load(old_steps + tensor)

    # The base direction u (docs/algorithm.md section 3) and, for the param level, u_prev.
    if KIND == ADAM:
        m = tl.load(s1_ptr, mask=mask, other=other)
        v = tl.load(s2_ptr, mask=mask, other=other)  # with amsgrad: vmax (kernels/common.py)
        if HAS_PARAM:
            last = tl.maximum(old_step, 1.0)  # as in the reduction: u_prev = 0 if never stepped
            bc1, bc2 = bias_correction(last, log_beta1), bias_correction(last, log_beta2)
            u_prev = adam_direction(m, v, bc1, bc2, eps)
        m = beta1 * m + (1.0 - beta1) * g
        tl.store(s1_ptr, m, mask=mask)
        if AMSGRAD:
            vmax = v
            v_ptr = tl.load(pointers + ROLE_STATE3 * n_tensors + tensor).to(tl.pointer_type(tl.float32))
            if ALIGNED:
                v_ptr = tl.multiple_of(v_ptr, 16)
            v_ptr = v_ptr + offs
            v = beta2 * tl.load(v_ptr, mask=mask, other=other) + (1.0 - beta2) * g * g
            tl.store(v_ptr, v, mask=mask)
            # torch.maximum(vmax, v) of the raw v, before bias correction (NaN propagates)
            v = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        else:
            v = beta2 * v + (1.0 - beta2) * g * g
        tl.store(s2_ptr, v, mask=mask)
        now = old_step + 1.0
        u = adam_direction(m, v, bias_correction(now, log_beta1), bias_correction(now, log_beta2), eps)
    elif MOMENTUM:
        buf_ptr = s1_ptr
        if NESTEROV:
            buf_ptr = s2_ptr
        buf = tl.load(buf_ptr, mask=mask, other=other)
        if HAS_PARAM:
            if NESTEROV:
                u_prev = tl.load(s1_ptr, mask=mask, other=other)
            else:
                u_prev = buf
        buf = tl.where(old_step == 0.0, g, momentum * buf + (1.0 - dampening) * g)
        tl.store(buf_ptr, buf, mask=mask)
        u = buf
        if NESTEROV:
            u = g + momentum * buf
            tl.store(s1_ptr, u, mask=mask)
    else:
        if HAS_PARAM:
            u_prev = tl.load(s1_ptr, mask=mask, other=other)
        u = g
        tl.store(s1_ptr, u, mask=mask)

    # The applied rate kappa (docs/algorithm.md step 6); coarse levels come per unit.
    if PER_UNIT:
        # unit = (offset // unit_stride) % units, split so that the per-element part is
        # int32 (a row spans less than 2^31 elements); dense rows never wrap around.
        first = start // unit_stride
        unit = ((start - first * unit_stride).to(tl.int32) + idx) // unit_stride.to(tl.int32)
        if STRIDED:
            unit = ((first % units).to(tl.int32) + unit) % units.to(tl.int32)
        else:
            unit = first + unit
        unit = unit_offset + unit
        kappa = tl.load(kappa_units + unit * kappa_stride, mask=mask, other=other)
    else:
        kappa = tl.load(kappa_units)
    if HAS_PARAM:
        rate = tl.load(rate_ptr, mask=mask, other=other)
        h = g * u_prev
        if MULTIPLICATIVE:
            sign = tl.where(h > 0, 1.0, tl.where(h < 0, -1.0, 0.0))
            new = rate * (1.0 + tl.load(param_hd_ptr) * sign)
        else:
            new = rate + tl.load(param_hd_ptr) * h
        if SHRINK:
            if PER_UNIT:
                parent = tl.load(parent_ptr + unit * parent_stride, mask=mask, other=other)
            else:
                parent = tl.load(parent_ptr)
            new = new + shrink * (parent - new)
        if CLAMP_LO:
            new = tl.maximum(new, lo)
        if CLAMP_HI:
            new = tl.minimum(new, hi)
        rate = tl.where(tl.load(hd_gate_ptr) != 0.0, new, rate)
        tl.store(rate_ptr, rate, mask=mask)
        kappa = kappa + tl.load(param_kappa_ptr) * rate
    if DECOUPLED_WD:
        p = p * (1.0 - kappa * weight_decay)
    tl.store(p_ptr, to_dtype(p - kappa * u, P_DTYPE), mask=mask)


@triton.jit
def step_kernel(
    chunks, n_bucket_chunks, pointers, table, n_tensors, old_steps, gate_ptr, grad_factor_ptr,
    hd_gate_ptr, kappa_units, kappa_stride, param_kappa_ptr, param_hd_ptr, parent_ptr, parent_stride,
    weight_decay, beta1, beta2, log_beta1, log_beta2, eps, momentum, dampening, shrink, lo, hi,
    P_DTYPE: tl.constexpr, KIND: tl.constexpr, AMSGRAD: tl.constexpr, MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, COUPLED_WD: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
    DECOUPLED_WD: tl.constexpr, HAS_PARAM: tl.constexpr, MULTIPLICATIVE: tl.constexpr,
    SHRINK: tl.constexpr, CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr, PER_UNIT: tl.constexpr,
    STRIDED: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(chunks + CHUNK_TENSOR * n_bucket_chunks + pid)
    start = tl.multiple_of(tl.load(chunks + CHUNK_START * n_bucket_chunks + pid), BLOCK)
    numel, _, unit_offset, _, _, _, unit_stride, units = tensor_meta(table, tensor)
    if tl.load(gate_ptr) != 0.0:
        grad_factor = load_grad_factor(grad_factor_ptr)  # maximize's sign over GradScaler's scale
        if start + BLOCK <= numel:
            _step_block(
                tensor, start, numel, units, unit_offset, unit_stride, pointers, n_tensors, old_steps,
                grad_factor, hd_gate_ptr, kappa_units, kappa_stride, param_kappa_ptr, param_hd_ptr, parent_ptr,
                parent_stride, weight_decay, beta1, beta2, log_beta1, log_beta2, eps, momentum,
                dampening, shrink, lo, hi, P_DTYPE, KIND, AMSGRAD, MOMENTUM, NESTEROV, COUPLED_WD,
                SKIP_NONFINITE, DECOUPLED_WD, HAS_PARAM, MULTIPLICATIVE, SHRINK, CLAMP_LO, CLAMP_HI,
                PER_UNIT, STRIDED, ALIGNED, True,
            )
        else:
            _step_block(
                tensor, start, numel, units, unit_offset, unit_stride, pointers, n_tensors, old_steps,
                grad_factor, hd_gate_ptr, kappa_units, kappa_stride, param_kappa_ptr, param_hd_ptr, parent_ptr,
                parent_stride, weight_decay, beta1, beta2, log_beta1, log_beta2, eps, momentum,
                dampening, shrink, lo, hi, P_DTYPE, KIND, AMSGRAD, MOMENTUM, NESTEROV, COUPLED_WD,
                SKIP_NONFINITE, DECOUPLED_WD, HAS_PARAM, MULTIPLICATIVE, SHRINK, CLAMP_LO, CLAMP_HI,
                PER_UNIT, STRIDED, ALIGNED, False,
            )
