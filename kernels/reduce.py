"""Stage 1 of a step: the reduction pass and its finishing launch.

`reduce_kernel` reads g (and what gives u_prev) once and writes, per reduction piece, the
sums S = sum g*u_prev (and Qg = sum g^2, Qu = sum u_prev^2 for the multiplicative rule),
plus per program the non-finite count and the param-level partials. A piece is a run of
at most COLS elements of one unit; a unit of a short row is one piece, so its sum lands
straight in the group's unit array; a long row is split into several pieces whose sums
`finish_kernel` adds in a fixed order. Programs never share an output, so there are no
atomics and the result does not depend on scheduling.

Tiles are [ROWS, COLS] with one piece per tile row. Rows come in three classes (a runtime
branch per program, so one launch covers all of them): rows of at most NARROW elements
(biases, norms, depthwise filters) in narrow tiles, longer rows in WIDE-column tiles, and
WIDE4: long rows whose length is a multiple of 4, where (given 16-byte aligned tensors)
the compiler may use 16-byte loads. A STRIDED launch handles the tensors whose units are
not contiguous (see `common`): the same tiles, each piece gathered run by run.
"""
import triton
import triton.language as tl

from .common import (
    ADAM, ROLE_STEP, adam_direction, bias_correction, effective_grad, load_grad_factor, tensor_meta,
    tensor_pointers,
)

TILE = tl.constexpr(4096)  # elements per reduction program
NARROW = tl.constexpr(16)
WIDE = tl.constexpr(256)
CLASS_NARROW = tl.constexpr(0)
CLASS_WIDE = tl.constexpr(1)
CLASS_WIDE4 = tl.constexpr(2)
REDUCE_WARPS = 8
# Rows of the chunk table (int64 [CHUNK_COLS, n_chunks]): the tensor, the unit and the
# piece within it of the tile's first row (precomputed: a 64-bit division is a long
# software routine on the GPU), the tile class.
CHUNK_TENSOR, CHUNK_UNIT, CHUNK_PIECE, CHUNK_CLASS = (tl.constexpr(i) for i in range(4))
CHUNK_COLS = 4
# Rows of the per-program partials (float32 [3, n_chunks]).
PARTIAL_BAD, PARTIAL_DOT, PARTIAL_SQ = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FINISH_BLOCK = tl.constexpr(1024)  # partials or step counts per iteration
FINISH_UNITS = tl.constexpr(32)  # long units per program, their pieces FINISH_PIECES at a time
FINISH_PIECES = tl.constexpr(32)


@triton.jit
def _reduce_tile(
    chunk, tensor, first_unit, first_piece, pointers, table, n_tensors, sums, sums_stride, partials,
    n_chunks, grad_factor, weight_decay, log_beta1, log_beta2, eps,
    P_DTYPE: tl.constexpr, KIND: tl.constexpr, COUPLED_WD: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr, NEED_SUMS: tl.constexpr, MULTIPLICATIVE: tl.constexpr,
    PARAM_SUMS: tl.constexpr, STRIDED: tl.constexpr, ALIGNED: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, ROW4: tl.constexpr,
):
    """One tile: ROWS pieces of `tensor` in order, one per row, from piece first_piece
    (int32) of unit first_unit. ROW4: row and piece lengths are multiples of 4 (so pieces
    start 16-byte aligned).

    Positions within a unit are int32, so no per-element division is 64-bit: a row has
    fewer than 2**31 - 2048 elements (triton_tables.MAX_ROW_LEN), so row_len + ROWS + COLS
    bounds every such value, unit_stride <= row_len (it is the product of the sizes
    of the dimensions inside dimension 0) and pieces <= row_len."""
    _, row_len, _, pieces, piece_len, slot, unit_stride, units = tensor_meta(table, tensor)
    p_ptr, g_ptr, s1_ptr, s2_ptr, rate_ptr = tensor_pointers(pointers, tensor, n_tensors, P_DTYPE, ALIGNED)
    if ROW4:  # no-ops that tell the compiler so (a hint on an inlined helper's result is lost)
        row_len = row_len // 4 * 4
        piece_len = piece_len // 4 * 4
    pieces32 = pieces.to(tl.int32)
    local = first_piece + tl.arange(0, ROWS)  # the tile's pieces, from piece 0 of first_unit
    unit_step = local // pieces32
    unit = first_unit + unit_step
    k = local - unit_step * pieces32  # which piece of its unit
    q = first_unit * pieces + local  # the pieces, numbered within the tensor
    col = tl.arange(0, COLS)[None, :]
    pos = k[:, None] * piece_len.to(tl.int32) + col  # position in the unit, in memory order
    live = unit < units
    mask = live[:, None] & (col < piece_len) & (pos < row_len)
    if STRIDED:
        stride32 = unit_stride.to(tl.int32)
        run = pos // stride32
        offs = unit[:, None] * unit_stride + run * (unit_stride * units) + (pos - run * stride32)
    else:
        start = unit * row_len + k * piece_len
        if ROW4:
            start = tl.multiple_of(start, 4)
        offs = start[:, None] + col

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = g  # read only for coupled weight decay
    if COUPLED_WD:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g, finite = effective_grad(g, p, grad_factor, weight_decay, COUPLED_WD, SKIP_NONFINITE)
    tl.store(partials + PARTIAL_BAD * n_chunks + chunk, tl.sum(tl.where(finite, 0.0, 1.0)))
    if NEED_SUMS:
        u = tl.load(s1_ptr + offs, mask=mask, other=0.0)  # SGD: u_prev itself; Adam: m
        if KIND == ADAM:
            # u_prev from the moments before this step; a parameter that never stepped has
            # m = v = 0, and max(step, 1) keeps the bias corrections finite (u_prev = 0).
            step = tl.load(tl.load(pointers + ROLE_STEP * n_tensors + tensor).to(tl.pointer_type(tl.float32)))
            step = tl.maximum(step, 1.0)
            # masked lanes: m = 0 and v = 1 give u = 0 for every eps (v = 0 and eps = 0,
            # a legal Adam option, would give 0/0 = NaN and poison the sums)
            v = tl.load(s2_ptr + offs, mask=mask, other=1.0)
            u = adam_direction(u, v, bias_correction(step, log_beta1), bias_correction(step, log_beta2), eps)
        h = g * u
        out = sums + slot + q
        tl.store(out, tl.sum(h, axis=1), mask=live)
        if MULTIPLICATIVE:
            tl.store(out + sums_stride, tl.sum(g * g, axis=1), mask=live)
            tl.store(out + 2 * sums_stride, tl.sum(u * u, axis=1), mask=live)
        if PARAM_SUMS:
            rate = tl.load(rate_ptr + offs, mask=mask, other=0.0)
            tl.store(partials + PARTIAL_DOT * n_chunks + chunk, tl.sum(rate * h))
            if MULTIPLICATIVE:
                rg = rate * g
                tl.store(partials + PARTIAL_SQ * n_chunks + chunk, tl.sum(rg * rg))


@triton.jit
def reduce_kernel(
    chunks, n_bucket_chunks, chunk_base, pointers, table, n_tensors, sums, sums_stride, partials,
    n_chunks, grad_factor_ptr, weight_decay, log_beta1, log_beta2, eps,
    P_DTYPE: tl.constexpr, KIND: tl.constexpr, COUPLED_WD: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr, NEED_SUMS: tl.constexpr, MULTIPLICATIVE: tl.constexpr,
    PARAM_SUMS: tl.constexpr, STRIDED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One program per chunk of the bucket's chunk table (one dtype of the group); its
    partials go to column chunk_base + program of the group's partials. grad_factor_ptr:
    the 0-d float32 grad factor (maximize's sign over GradScaler's scale)."""
    pid = tl.program_id(0)
    grad_factor = load_grad_factor(grad_factor_ptr)
    tensor = tl.load(chunks + CHUNK_TENSOR * n_bucket_chunks + pid)
    first_unit = tl.load(chunks + CHUNK_UNIT * n_bucket_chunks + pid)
    first_piece = tl.load(chunks + CHUNK_PIECE * n_bucket_chunks + pid).to(tl.int32)
    cls = tl.load(chunks + CHUNK_CLASS * n_bucket_chunks + pid)
    chunk = chunk_base + pid
    if cls == CLASS_NARROW:
        _reduce_tile(
            chunk, tensor, first_unit, first_piece, pointers, table, n_tensors, sums, sums_stride, partials,
            n_chunks, grad_factor, weight_decay, log_beta1, log_beta2, eps, P_DTYPE, KIND, COUPLED_WD,
            SKIP_NONFINITE, NEED_SUMS, MULTIPLICATIVE, PARAM_SUMS, STRIDED, ALIGNED,
            TILE // NARROW, NARROW, False,
        )
    elif cls == CLASS_WIDE:
        _reduce_tile(
            chunk, tensor, first_unit, first_piece, pointers, table, n_tensors, sums, sums_stride, partials,
            n_chunks, grad_factor, weight_decay, log_beta1, log_beta2, eps, P_DTYPE, KIND, COUPLED_WD,
            SKIP_NONFINITE, NEED_SUMS, MULTIPLICATIVE, PARAM_SUMS, STRIDED, ALIGNED,
            TILE // WIDE, WIDE, False,
        )
    else:
        _reduce_tile(
            chunk, tensor, first_unit, first_piece, pointers, table, n_tensors, sums, sums_stride, partials,
            n_chunks, grad_factor, weight_decay, log_beta1, log_beta2, eps, P_DTYPE, KIND, COUPLED_WD,
            SKIP_NONFINITE, NEED_SUMS, MULTIPLICATIVE, PARAM_SUMS, STRIDED, ALIGNED,
            TILE // WIDE, WIDE, True,
        )


@triton.jit
def _finish_units(long_units, n_long, max_pieces, sums, sums_stride, MULTIPLICATIVE: tl.constexpr):
    """Units of long rows: add their pieces in order, FINISH_UNITS units per program.
    long_units is int64 [3, n_long]: the unit, the slot of its first piece, its pieces."""
    i = tl.program_id(0) * FINISH_UNITS + tl.arange(0, FINISH_UNITS)
    live = i < n_long
    unit = tl.load(long_units + i, mask=live, other=0)
    first = tl.load(long_units + n_long + i, mask=live, other=0)
    count = tl.load(long_units + 2 * n_long + i, mask=live, other=0)
    s = tl.zeros([FINISH_UNITS], dtype=tl.float32)
    qg = tl.zeros([FINISH_UNITS], dtype=tl.float32)
    qu = tl.zeros([FINISH_UNITS], dtype=tl.float32)
    j = 0
    while j < max_pieces:
        piece = j + tl.arange(0, FINISH_PIECES)[None, :]
        mask = live[:, None] & (piece < count[:, None])
        src = sums + first[:, None] + piece
        s += tl.sum(tl.load(src, mask=mask, other=0.0), axis=1)
        if MULTIPLICATIVE:
            qg += tl.sum(tl.load(src + sums_stride, mask=mask, other=0.0), axis=1)
            qu += tl.sum(tl.load(src + 2 * sums_stride, mask=mask, other=0.0), axis=1)
        j += FINISH_PIECES
    tl.store(sums + unit, s, mask=live)
    if MULTIPLICATIVE:
        tl.store(sums + sums_stride + unit, qg, mask=live)
        tl.store(sums + 2 * sums_stride + unit, qu, mask=live)


@triton.jit
def _finish_group(
    partials, n_chunks, pointers, n_tensors, finite_out, param_sums, old_steps, found_inf_ptr,
    MULTIPLICATIVE: tl.constexpr, PARAM_SUMS: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    """The group-wide scalars, summed over the programs' partials in program order; then
    every parameter's step count moves by the gate, its old value kept for the step pass
    (which must not read a count that another of its programs may already have moved).
    The gate is the level stage's: 0 for a non-finite g (with the guard on) and for
    GradScaler's found_inf > 0 (a float32 0-d tensor, HAS_FOUND_INF)."""
    bad = 0.0
    dot = 0.0
    sq = 0.0
    i = 0
    while i < n_chunks:
        idx = i + tl.arange(0, FINISH_BLOCK)
        live = idx < n_chunks
        bad += tl.sum(tl.load(partials + PARTIAL_BAD * n_chunks + idx, mask=live, other=0.0))
        if PARAM_SUMS:
            dot += tl.sum(tl.load(partials + PARTIAL_DOT * n_chunks + idx, mask=live, other=0.0))
            if MULTIPLICATIVE:
                sq += tl.sum(tl.load(partials + PARTIAL_SQ * n_chunks + idx, mask=live, other=0.0))
        i += FINISH_BLOCK
    finite = bad == 0.0
    tl.store(finite_out, finite.to(tl.uint8))  # a uint8 buffer, viewed as bool on the host
    if PARAM_SUMS:
        tl.store(param_sums, dot)
        tl.store(param_sums + 1, sq)
    gate = 1.0
    if SKIP_NONFINITE:
        gate = finite.to(tl.float32)
    if HAS_FOUND_INF:
        gate = tl.where(tl.load(found_inf_ptr) > 0.0, 0.0, gate)
    i = 0
    while i < n_tensors:
        idx = i + tl.arange(0, FINISH_BLOCK)
        live = idx < n_tensors
        step_ptr = tl.load(pointers + ROLE_STEP * n_tensors + idx, mask=live, other=0)
        step_ptr = step_ptr.to(tl.pointer_type(tl.float32))
        old = tl.load(step_ptr, mask=live, other=0.0)
        tl.store(old_steps + idx, old, mask=live)
        tl.store(step_ptr, old + gate, mask=live)
        i += FINISH_BLOCK


@triton.jit
def finish_kernel(
    long_units, n_long, max_pieces, sums, sums_stride, partials, n_chunks, pointers, n_tensors,
    finite_out, param_sums, old_steps, found_inf_ptr,
    MULTIPLICATIVE: tl.constexpr, PARAM_SUMS: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    """Programs 0 .. cdiv(n_long, FINISH_UNITS) - 1 finish the long units; the last one the
    group-wide scalars and the step counts."""
    if tl.program_id(0) < tl.cdiv(n_long, FINISH_UNITS):
        _finish_units(long_units, n_long, max_pieces, sums, sums_stride, MULTIPLICATIVE)
    else:
        _finish_group(
            partials, n_chunks, pointers, n_tensors, finite_out, param_sums, old_steps, found_inf_ptr,
            MULTIPLICATIVE, PARAM_SUMS, SKIP_NONFINITE, HAS_FOUND_INF,
        )
