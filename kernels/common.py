"""What the reduction and the step kernels share: the launch-table layout and the
per-element math both passes must compute identically (the effective gradient, the Adam
direction, the bias corrections, the parameter-dtype rounding).

Launch tables (built by `multilevel_hd.backends.triton_tables`):
  pointers  int64 [NUM_ROLES, n_tensors]: row `role` holds each tensor's address for that
            role (one row per role so the gradient row can be re-uploaded on its own).
  meta      int64 [n_tensors, META_COLS]: sizes and offsets, one row per tensor.
Every tensor is addressed as a flat array in memory order. For any dense layout, unit j
(the slice p[j]) is the elements whose offset o has (o // unit_stride) % units == j, with
unit_stride = p.stride(0): where dim 0 is outermost (contiguous, channels_last) that is
the block [j * row_len, (j + 1) * row_len); otherwise ("strided", e.g. a transposed weight)
it is `row_len / unit_stride` runs of unit_stride elements, units * unit_stride apart.
"""
import triton
import triton.language as tl

ROLE_PARAM = tl.constexpr(0)
ROLE_GRAD = tl.constexpr(1)
# SGD keeps what gives u_prev in STATE1 (prev_direction, or momentum_buffer without
# Nesterov), so the reduction reads one role for every SGD flavour.
ROLE_STATE1 = tl.constexpr(2)  # Adam: exp_avg; SGD: prev_direction | momentum_buffer
# Adam keeps what u divides by in STATE2 (exp_avg_sq, or max_exp_avg_sq with amsgrad), so
# the reduction reads the same roles with and without amsgrad; only the step kernel, which
# updates v and its maximum, reads STATE3.
ROLE_STATE2 = tl.constexpr(3)  # Adam: exp_avg_sq | max_exp_avg_sq; SGD Nesterov: momentum_buffer
ROLE_RATE = tl.constexpr(4)  # param_rate (the param level)
ROLE_STEP = tl.constexpr(5)  # the parameter's own step count, float32 0-d
ROLE_STATE3 = tl.constexpr(6)  # Adam with amsgrad: exp_avg_sq
NUM_ROLES = 7

META_NUMEL = tl.constexpr(0)
META_ROW_LEN = tl.constexpr(1)  # elements per unit
META_UNIT_OFFSET = tl.constexpr(2)  # the tensor's first unit in the group's unit array
META_PIECES = tl.constexpr(3)  # reduction pieces per unit (1 unless the row is long)
META_PIECE_LEN = tl.constexpr(4)  # elements per piece (the last piece of a unit may be shorter)
META_SLOT = tl.constexpr(5)  # where the tensor's piece sums go in the sums rows
META_UNIT_STRIDE = tl.constexpr(6)  # p.stride(0): row_len unless the layout is strided
META_UNITS = tl.constexpr(7)  # numel // row_len, so that no kernel divides in 64 bits for it
META_COLS = tl.constexpr(8)

# Base optimizer (the `KIND` switch of both kernels).
SGD = tl.constexpr(0)
ADAM = tl.constexpr(1)


@triton.jit
def tensor_meta(table, tensor):
    """The tensor's metadata row:
    (numel, row_len, unit_offset, pieces, piece_len, slot, unit_stride, units)."""
    row = table + tensor * META_COLS
    return (
        tl.load(row + META_NUMEL), tl.load(row + META_ROW_LEN), tl.load(row + META_UNIT_OFFSET),
        tl.load(row + META_PIECES), tl.load(row + META_PIECE_LEN), tl.load(row + META_SLOT),
        tl.load(row + META_UNIT_STRIDE), tl.load(row + META_UNITS),
    )


@triton.jit
def tensor_pointers(pointers, tensor, n_tensors, P_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor's (param, grad, state1, state2, rate) addresses, typed for loads and
    stores; ALIGNED: all are 16-byte aligned, which the compiler needs to vectorise."""
    column = pointers + tensor
    param = tl.load(column + ROLE_PARAM * n_tensors).to(tl.pointer_type(P_DTYPE))
    grad = tl.load(column + ROLE_GRAD * n_tensors).to(tl.pointer_type(P_DTYPE))
    state1 = tl.load(column + ROLE_STATE1 * n_tensors).to(tl.pointer_type(tl.float32))
    state2 = tl.load(column + ROLE_STATE2 * n_tensors).to(tl.pointer_type(tl.float32))
    rate = tl.load(column + ROLE_RATE * n_tensors).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        param, grad = tl.multiple_of(param, 16), tl.multiple_of(grad, 16)
        state1, state2 = tl.multiple_of(state1, 16), tl.multiple_of(state2, 16)
        rate = tl.multiple_of(rate, 16)
    return param, grad, state1, state2, rate


@triton.jit
def effective_grad(g, p, factor, weight_decay, COUPLED_WD: tl.constexpr, SKIP_NONFINITE: tl.constexpr):
    """docs/algorithm.md step 1, then the non-finite guard's view of it: (g, finite).

    `factor` is the group's grad factor, (-1 if maximize) / GradScaler's scale (a float32
    scalar each program loads once from device memory, see `load_grad_factor`): the raw
    gradient is unscaled before the coupled weight decay, which must see the true g.
    With the guard on, NaN/Inf are zeroed: that keeps every sum and every gated update
    finite when the step is skipped, and when nothing is zeroed the step proceeds with g
    unchanged. Without the guard they propagate, as in torch.optim."""
    g = g * factor
    if COUPLED_WD:
        g = g + weight_decay * p
    finite = tl.abs(g) < float("inf")  # False for NaN as well
    if SKIP_NONFINITE:
        g = tl.where(finite, g, 0.0)
    return g, finite


@triton.jit
def load_grad_factor(grad_factor_ptr):
    """The grad factor (a 0-d float32 device tensor: GroupJob.grad_factor), once per program."""
    return tl.load(grad_factor_ptr).to(tl.float32)


@triton.jit
def bias_correction(step, log_beta):
    """1 - beta**step, from log(beta) and a float32 step count.

    Computed in float64 (a scalar per program): at step 1, 1 - beta is small and a float32
    power would lose most of its digits."""
    return (1.0 - tl.exp(tl.cast(step, tl.float64) * tl.cast(log_beta, tl.float64))).to(tl.float32)


@triton.jit
def adam_direction(m, v, bc1, bc2, eps):
    """docs/algorithm.md section 3: (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).

    IEEE-rounded, as torch.optim's fused Adam and the cuda backend: on CUDA `/` and
    tl.sqrt compile to approximations (div.full.f32, sqrt.approx.ftz.f32);
    tests/test_triton_ptx.py checks the PTX. m = 0 gives m itself (what the division gives
    wherever it is defined): with eps = 0 a parameter that never stepped has u_prev = 0."""
    return tl.where(m == 0.0, m, tl.div_rn(tl.div_rn(m, bc1), tl.sqrt_rn(tl.div_rn(v, bc2)) + eps))


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE with round-to-nearest-even, as torch rounds.

    bfloat16 is rounded by hand: the interpreter's float32 -> bfloat16 cast truncates,
    and a truncating cast biases every half-precision step toward zero. A NaN is
    truncated with its quiet bit set instead: the rounding's carry would turn 0x7FFFFFFF
    (a GPU's NaN) into -0.0, and truncation alone 0x7F800001 into +Inf."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
