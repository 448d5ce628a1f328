"""Stage 2 of a step: the level stage (docs/algorithm.md steps 2 and 4, the coarse part of 6) in two launches.

It computes what `multilevel_hd.levels.update_levels` computes, from the same inputs
(the per-unit sums S, Qg, Qu of the reduction, the param-level partials, the non-finite
flag, GradScaler's found_inf, the group state) to the same outputs: the group state
updated in place and the coefficients the step kernel reads. Nothing is read on the
host: the gate, t and "t >= 2" are values in device memory.

`level_sums_kernel`, one program per block of layers (tensors of the group): each layer's
segment sums of the unit array (S, Qg, Qu) and its share of the weights' sums over the unit level
(sum alpha_unit_old * S, sum alpha_unit_old^2 * Qg), into a scratch buffer; it also copies
the old values that every program of the next launch reads (t, lr_scale, the weights,
the global rate, the layer rates), because that launch overwrites them.

`level_update_kernel`, one program per block of units (and of layers): every program
first recomputes the group's scalars (gate, t, tau, the global sums, the new weights, the
new global rate) from the scratch buffer, in one fixed order, so all programs agree
bit for bit; then it writes the new rates of its units and layers, the applied rates
(kappa per unit), and program 0 the group scalars. Every right-hand side reads the old
values (the scratch copy, or the program's own elements before it overwrites them).

Sums run over fixed blocks in a fixed order that depends only on the plan (the layer
boundaries and the block sizes), never on scheduling: no atomics, two runs are
bit-identical. Runtime loop bounds (a kernel argument, a block's longest layer) drive
`while` loops: the Triton interpreter cannot run `range` over them.

A layer's units are summed by one program, so a very long layer (an embedding's rows)
is a serial loop of ceil(units / BLOCK) tiles in that program.
"""
import triton
import triton.language as tl

from ..options import MAX_UNNORMALISED_WEIGHT as _MAX_UNNORMALISED_WEIGHT

# Rows of the scratch buffer (float32 [SCRATCH_ROWS * n_layers + SNAP_SIZE]), one entry per layer.
ROW_S = tl.constexpr(0)  # sum of S over the layer's units
ROW_QG = tl.constexpr(1)  # sum of Qg
ROW_QU = tl.constexpr(2)  # sum of Qu
ROW_A = tl.constexpr(3)  # sum of alpha_unit_old * S (the unit level's weight sum, per layer)
ROW_R = tl.constexpr(4)  # sum of alpha_unit_old^2 * Qg
ROW_OLD_LAYER = tl.constexpr(5)  # the old layer rate
SCRATCH_ROWS = tl.constexpr(6)
# After the rows: the old group scalars.
SNAP_STEP = tl.constexpr(0)
SNAP_LR_SCALE = tl.constexpr(1)
SNAP_GLOBAL = tl.constexpr(2)
SNAP_WEIGHTS = tl.constexpr(3)  # K entries
SNAP_SIZE = tl.constexpr(8)
MAX_LEVELS = tl.constexpr(4)
MAX_UNNORMALISED_WEIGHT = tl.constexpr(_MAX_UNNORMALISED_WEIGHT)  # the weights' cap before normalising
# The coefficient buffer (float32 [OUT_UNITS + 2 * n_units]) the step kernel reads.
OUT_GATE = tl.constexpr(0)
OUT_HD_GATE = tl.constexpr(1)
OUT_PARAM_KAPPA = tl.constexpr(2)
OUT_PARAM_HD = tl.constexpr(3)
OUT_PARENT = tl.constexpr(4)  # param_parent when the param level's parent is global
OUT_KAPPA = tl.constexpr(5)  # kappa when no level has one rate per unit (global, param only)
OUT_UNITS = tl.constexpr(8)  # kappa_units [n_units], then param_parent [n_units] (layer or unit parent)
# Where param-level shrinkage pulls to (PARAM_PARENT).
PARENT_NONE = tl.constexpr(0)
PARENT_GLOBAL = tl.constexpr(1)
PARENT_LAYER = tl.constexpr(2)
PARENT_UNIT = tl.constexpr(3)
# Host side: the block sizes (powers of 2) that the backend picks per plan.
MAX_BLOCK = 1024  # units or layers per block, at most
SUMS_TILE = 2048  # elements of a tile of level_sums_kernel (LAYERS * BLOCK), at most
LEVEL_WARPS = 8  # both kernels: up to five [2048] accumulators, or ~15 live [1024] vectors


@triton.jit
def level_sums_kernel(
    s_ptr, qg_ptr, qu_ptr, rate_unit, layer_table, n_layers, scratch,
    step, lr_scale, weights, rate_global, rate_layer,
    K: tl.constexpr, KG: tl.constexpr, KL: tl.constexpr, KU: tl.constexpr,
    MULTIPLICATIVE: tl.constexpr, LAYERS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program p: the sums of layers [p * LAYERS, (p + 1) * LAYERS) over their units
    (int32 layer_table [2, n_layers]: the first unit, the number of units), a [LAYERS, BLOCK]
    tile at a time, one layer per row, up to the block's longest layer; program 0 also
    copies the old scalars. A layer's sum does not depend on LAYERS: BLOCK lanes, each
    added up in unit order, then reduced."""
    pid = tl.program_id(0)
    layer = pid * LAYERS + tl.arange(0, LAYERS)
    live = layer < n_layers
    first = tl.load(layer_table + layer, mask=live, other=0)
    count = tl.load(layer_table + n_layers + layer, mask=live, other=0)
    acc_s = tl.zeros([LAYERS, BLOCK], dtype=tl.float32)
    acc_qg = tl.zeros([LAYERS, BLOCK], dtype=tl.float32)
    acc_qu = tl.zeros([LAYERS, BLOCK], dtype=tl.float32)
    acc_a = tl.zeros([LAYERS, BLOCK], dtype=tl.float32)
    acc_r = tl.zeros([LAYERS, BLOCK], dtype=tl.float32)
    longest = tl.max(count)
    start = 0
    while start < longest:
        j = start + tl.arange(0, BLOCK)[None, :]
        cells = j < count[:, None]
        unit = first[:, None] + j
        s = tl.load(s_ptr + unit, mask=cells, other=0.0)
        acc_s += s
        if MULTIPLICATIVE:
            qg = tl.load(qg_ptr + unit, mask=cells, other=0.0)
            acc_qg += qg
            acc_qu += tl.load(qu_ptr + unit, mask=cells, other=0.0)
        if KU >= 0 and K > 1:  # the unit level's terms of the weights' hyper-gradient
            rate = tl.load(rate_unit + unit, mask=cells, other=0.0)
            acc_a += rate * s
            if MULTIPLICATIVE:
                acc_r += rate * rate * qg
        start += BLOCK
    tl.store(scratch + ROW_S * n_layers + layer, tl.sum(acc_s, axis=1), mask=live)
    if MULTIPLICATIVE:
        tl.store(scratch + ROW_QG * n_layers + layer, tl.sum(acc_qg, axis=1), mask=live)
        tl.store(scratch + ROW_QU * n_layers + layer, tl.sum(acc_qu, axis=1), mask=live)
    if KU >= 0 and K > 1:
        tl.store(scratch + ROW_A * n_layers + layer, tl.sum(acc_a, axis=1), mask=live)
        if MULTIPLICATIVE:
            tl.store(scratch + ROW_R * n_layers + layer, tl.sum(acc_r, axis=1), mask=live)
    if KL >= 0:
        old = tl.load(rate_layer + layer, mask=live, other=0.0)
        tl.store(scratch + ROW_OLD_LAYER * n_layers + layer, old, mask=live)
    if pid == 0:
        snap = scratch + SCRATCH_ROWS * n_layers
        tl.store(snap + SNAP_STEP, tl.load(step))
        tl.store(snap + SNAP_LR_SCALE, tl.load(lr_scale))
        if KG >= 0:
            tl.store(snap + SNAP_GLOBAL, tl.load(rate_global))
        k = tl.arange(0, MAX_LEVELS)
        tl.store(snap + SNAP_WEIGHTS + k, tl.load(weights + k, mask=k < K, other=0.0), mask=k < K)


@triton.jit
def _clamp(x, lo, hi, CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr):
    """torch.clamp(x, lo, hi): NaN stays NaN."""
    if CLAMP_LO:
        x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    if CLAMP_HI:
        x = tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)
    return x


@triton.jit
def _lerp(start, end, weight, SMALL: tl.constexpr):
    """torch.lerp(start, end, weight) with its two formulas (SMALL: weight < 0.5)."""
    if SMALL:
        return start + weight * (end - start)
    else:
        return end - (end - start) * (1.0 - weight)


@triton.jit
def _hd(old, s, qg, qu, scale, beta, hd_prev, w, MULTIPLICATIVE: tl.constexpr):
    """docs/algorithm.md step 4, the HD update of one level's rates: additive
    old + (beta * hd_prev * w) * scale * s; multiplicative old * (1 + beta * w * cos)."""
    if MULTIPLICATIVE:
        prod = qg * qu
        cos = tl.where(prod > 0.0, tl.div_rn(s, tl.sqrt_rn(prod)), 0.0)
        return old * (1.0 + beta * w * cos)
    else:
        return old + beta * hd_prev * w * scale * s


@triton.jit
def _layer_rates(
    scratch, n_layers, layer, live, layer_scale, layer_mask, hd_global, hd_prev, hd_gate, w, beta,
    rho, lo, hi, MULTIPLICATIVE: tl.constexpr, SIZED: tl.constexpr, SHRINK: tl.constexpr,
    RHO_SMALL: tl.constexpr, CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr,
):
    """The layer level for the layers `layer` (a block of layers, or each unit's layer):
    (the HD-updated unshrunk rate, the rate after this step)."""
    old = tl.load(scratch + ROW_OLD_LAYER * n_layers + layer, mask=live, other=0.0)
    s = tl.load(scratch + ROW_S * n_layers + layer, mask=live, other=0.0)
    qg = s
    qu = s
    scale = 1.0
    if MULTIPLICATIVE:
        qg = tl.load(scratch + ROW_QG * n_layers + layer, mask=live, other=0.0)
        qu = tl.load(scratch + ROW_QU * n_layers + layer, mask=live, other=0.0)
    elif SIZED:
        scale = tl.load(layer_scale + layer, mask=live, other=0.0)
    hd = _hd(old, s, qg, qu, scale, beta, hd_prev, w, MULTIPLICATIVE)
    new = hd
    if SHRINK:  # the layer level's parent is global
        new = _lerp(hd, hd_global, rho, RHO_SMALL)
    new = _clamp(new, lo, hi, CLAMP_LO, CLAMP_HI)
    move = hd_gate * tl.load(layer_mask + layer, mask=live, other=0.0) > 0.0
    return hd, tl.where(move, new, old)


@triton.jit
def level_update_kernel(
    s_ptr, qg_ptr, qu_ptr, param_dot, param_sq, finite, found_inf, scratch, n_layers, n_units,
    layer_of_unit, unit_scale, layer_scale, unit_mask, layer_mask,
    step, skipped, lr_scale_state, weights, rate_global, rate_layer, rate_unit, applied_scale,
    applied_offset, out,
    beta_g, beta_l, beta_u, param_beta, rho_l, rho_u, delta, hd_decay, lr_scale, final_lr, lo, hi,
    K: tl.constexpr, KG: tl.constexpr, KL: tl.constexpr, KU: tl.constexpr, KP: tl.constexpr,
    MULTIPLICATIVE: tl.constexpr, SIZED: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, SHRINK_LAYER: tl.constexpr, SHRINK_UNIT: tl.constexpr,
    RHO_L_SMALL: tl.constexpr, RHO_U_SMALL: tl.constexpr, PARAM_PARENT: tl.constexpr,
    CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr, UNIT_BLOCK: tl.constexpr, LAYER_BLOCK: tl.constexpr,
):
    """Program p: units [p * UNIT_BLOCK, ...) and layers [p * LAYER_BLOCK, ...); program 0
    also the group scalars. K, KG, KL, KU, KP: the number of levels and each level's index
    in the weights (-1 if inactive). param_beta: beta_param * N (additive, size scaling),
    beta_param (otherwise)."""
    pid = tl.program_id(0)
    snap = scratch + SCRATCH_ROWS * n_layers

    # --- the group's scalars, identical in every program ------------------------------
    bad = 0.0
    if SKIP_NONFINITE:
        bad += tl.where(tl.load(finite) == 0, 1.0, 0.0)
    if HAS_FOUND_INF:
        bad += tl.where(tl.load(found_inf).to(tl.float32) > 0.0, 1.0, 0.0)
    gate = tl.where(bad == 0.0, 1.0, 0.0)
    t = tl.load(snap + SNAP_STEP) + gate
    hd_gate = gate * tl.where(t >= 2.0, 1.0, 0.0)
    # tau = exp(-hd_decay t), in float64 (a scalar) and rounded once
    decay = -tl.cast(hd_decay, tl.float64)
    tau_t = tl.exp(decay * t.to(tl.float64)).to(tl.float32)
    # d kappa_{t-1} / d alpha_k = lr_scale_{t-1} * tau_{t-1} * w_k
    hd_prev = tl.load(snap + SNAP_LR_SCALE) * tl.exp(decay * (t - 1.0).to(tl.float64)).to(tl.float32)
    applied = gate * lr_scale

    # Sums over the layers, LAYER_BLOCK at a time (the global sums and the weights' terms).
    acc_s = tl.zeros([LAYER_BLOCK], dtype=tl.float32)
    acc_qg = tl.zeros([LAYER_BLOCK], dtype=tl.float32)
    acc_qu = tl.zeros([LAYER_BLOCK], dtype=tl.float32)
    acc_al = tl.zeros([LAYER_BLOCK], dtype=tl.float32)
    acc_rl = tl.zeros([LAYER_BLOCK], dtype=tl.float32)
    acc_au = tl.zeros([LAYER_BLOCK], dtype=tl.float32)
    acc_ru = tl.zeros([LAYER_BLOCK], dtype=tl.float32)
    start = 0
    while start < n_layers:
        i = start + tl.arange(0, LAYER_BLOCK)
        live = i < n_layers
        s = tl.load(scratch + ROW_S * n_layers + i, mask=live, other=0.0)
        acc_s += s
        if MULTIPLICATIVE:
            qg = tl.load(scratch + ROW_QG * n_layers + i, mask=live, other=0.0)
            acc_qg += qg
            acc_qu += tl.load(scratch + ROW_QU * n_layers + i, mask=live, other=0.0)
        if K > 1:
            if KL >= 0:
                old = tl.load(scratch + ROW_OLD_LAYER * n_layers + i, mask=live, other=0.0)
                acc_al += old * s
                if MULTIPLICATIVE:
                    acc_rl += old * old * qg
            if KU >= 0:
                acc_au += tl.load(scratch + ROW_A * n_layers + i, mask=live, other=0.0)
                if MULTIPLICATIVE:
                    acc_ru += tl.load(scratch + ROW_R * n_layers + i, mask=live, other=0.0)
        start += LAYER_BLOCK
    s_global = tl.sum(acc_s)
    qg_global = tl.sum(acc_qg)
    qu_global = tl.sum(acc_qu)

    # The old weights (every right-hand side uses them), one scalar per active level.
    w_g = 0.0
    w_l = 0.0
    w_u = 0.0
    w_p = 0.0
    if KG >= 0:
        w_g = tl.load(snap + SNAP_WEIGHTS + KG)
    if KL >= 0:
        w_l = tl.load(snap + SNAP_WEIGHTS + KL)
    if KU >= 0:
        w_u = tl.load(snap + SNAP_WEIGHTS + KU)
    if KP >= 0:
        w_p = tl.load(snap + SNAP_WEIGHTS + KP)

    # The global level: no parent, never shrunk.
    old_g = 0.0
    hd_g = 0.0
    rate_g = 0.0
    if KG >= 0:
        old_g = tl.load(snap + SNAP_GLOBAL)
        hd_g = _hd(old_g, s_global, qg_global, qu_global, 1.0, beta_g, hd_prev, w_g, MULTIPLICATIVE)
        rate_g = tl.where(hd_gate > 0.0, _clamp(hd_g, lo, hi, CLAMP_LO, CLAMP_HI), old_g)

    # --- program 0: the group scalars --------------------------------------------------
    if pid == 0:
        tl.store(out + OUT_GATE, gate)
        tl.store(out + OUT_HD_GATE, hd_gate)
        tl.store(step, t)
        tl.store(skipped, tl.load(skipped) + (1.0 - gate).to(tl.int64))
        tl.store(lr_scale_state, tl.where(gate > 0.0, lr_scale, tl.load(snap + SNAP_LR_SCALE)))
        if KG >= 0:
            tl.store(rate_global, rate_g)
        if K > 1:  # the weights, used from the next step on
            k = tl.arange(0, MAX_LEVELS)
            w = tl.load(snap + SNAP_WEIGHTS + k, mask=k < K, other=0.0)
            a_dot_s = tl.where(k == KG, old_g * s_global, 0.0)
            a_dot_s = tl.where(k == KL, tl.sum(acc_al), a_dot_s)
            a_dot_s = tl.where(k == KU, tl.sum(acc_au), a_dot_s)
            if KP >= 0:
                a_dot_s = tl.where(k == KP, tl.load(param_dot), a_dot_s)
            if MULTIPLICATIVE:  # R_k = sum_e (alpha_k_old g)^2, U = sum_e u_prev^2
                r_sq = tl.where(k == KG, old_g * old_g * qg_global, 0.0)
                r_sq = tl.where(k == KL, tl.sum(acc_rl), r_sq)
                r_sq = tl.where(k == KU, tl.sum(acc_ru), r_sq)
                if KP >= 0:
                    r_sq = tl.where(k == KP, tl.load(param_sq), r_sq)
                denom = tl.sqrt_rn(r_sq * qu_global)
                new_w = w * tl.where(denom > 0.0, 1.0 + tl.div_rn(delta * a_dot_s, denom), 1.0)
            else:
                new_w = w + delta * hd_prev * a_dot_s
            new_w = tl.maximum(new_w, 0.0, propagate_nan=tl.PropagateNan.ALL)
            new_w = tl.minimum(new_w, MAX_UNNORMALISED_WEIGHT, propagate_nan=tl.PropagateNan.ALL)
            new_w = tl.where(k < K, new_w, 0.0)
            total = tl.sum(new_w)
            new_w = tl.where(total > 0.0, tl.div_rn(new_w, total), 1.0 / K)
            tl.store(weights + k, tl.where(hd_gate > 0.0, new_w, w), mask=k < K)
        if KP >= 0:
            tl.store(out + OUT_PARAM_KAPPA, applied * tau_t * w_p)
            if MULTIPLICATIVE:
                tl.store(out + OUT_PARAM_HD, param_beta * w_p)
            else:
                tl.store(out + OUT_PARAM_HD, param_beta * hd_prev * w_p)
        if PARAM_PARENT == PARENT_GLOBAL:  # finite even when a bad gradient skips the step
            tl.store(out + OUT_PARENT, tl.where(hd_gate > 0.0, hd_g, old_g))
        if KL < 0 and KU < 0:  # one kappa for every unit
            alpha = 0.0
            if KG >= 0:
                alpha = w_g * rate_g
            tl.store(out + OUT_KAPPA, applied * (tau_t * alpha + (1.0 - tau_t) * final_lr))

    # --- layers: the layer rates and what each tensor's step applied (record_applied_rates)
    layer = pid * LAYER_BLOCK + tl.arange(0, LAYER_BLOCK)
    live = layer < n_layers
    if KL >= 0:
        _, rate_l = _layer_rates(
            scratch, n_layers, layer, live, layer_scale, layer_mask, hd_g, hd_prev, hd_gate, w_l,
            beta_l, rho_l, lo, hi, MULTIPLICATIVE, SIZED, SHRINK_LAYER, RHO_L_SMALL, CLAMP_LO, CLAMP_HI,
        )
        tl.store(rate_layer + layer, rate_l, mask=live)
    stepped = tl.load(layer_mask + layer, mask=live, other=0.0) * gate > 0.0
    k = tl.arange(0, MAX_LEVELS)
    w = tl.load(snap + SNAP_WEIGHTS + k, mask=k < K, other=0.0)
    cell = applied_scale + layer[:, None] * K + k[None, :]
    cells = live[:, None] & (k < K)[None, :]
    old_scale = tl.load(cell, mask=cells, other=0.0)
    tl.store(cell, tl.where(stepped[:, None], (lr_scale * tau_t * w)[None, :], old_scale), mask=cells)
    offset = lr_scale * (1.0 - tau_t) * final_lr
    if KG >= 0:
        offset = offset + lr_scale * tau_t * w_g * rate_g
    old_offset = tl.load(applied_offset + layer, mask=live, other=0.0)
    tl.store(applied_offset + layer, tl.where(stepped, offset, old_offset), mask=live)

    # --- units: the unit rates, kappa per unit, param_parent per unit ------------------
    if KL >= 0 or KU >= 0:
        unit = pid * UNIT_BLOCK + tl.arange(0, UNIT_BLOCK)
        live = unit < n_units
        alpha = tl.zeros([UNIT_BLOCK], dtype=tl.float32)
        if KG >= 0:
            alpha = alpha + w_g * rate_g
        hd_l = alpha  # the layer level's values for each unit's layer (when it is active)
        if KL >= 0:
            my_layer = tl.load(layer_of_unit + unit, mask=live, other=0)
            hd_l, rate_l = _layer_rates(
                scratch, n_layers, my_layer, live, layer_scale, layer_mask, hd_g, hd_prev, hd_gate, w_l,
                beta_l, rho_l, lo, hi, MULTIPLICATIVE, SIZED, SHRINK_LAYER, RHO_L_SMALL, CLAMP_LO, CLAMP_HI,
            )
            alpha = alpha + w_l * rate_l
            if PARAM_PARENT == PARENT_LAYER:
                old_l = tl.load(scratch + ROW_OLD_LAYER * n_layers + my_layer, mask=live, other=0.0)
                tl.store(out + OUT_UNITS + n_units + unit, tl.where(hd_gate > 0.0, hd_l, old_l), mask=live)
        if KU >= 0:
            old_u = tl.load(rate_unit + unit, mask=live, other=0.0)
            s = tl.load(s_ptr + unit, mask=live, other=0.0)
            qg = s
            qu = s
            scale = 1.0
            if MULTIPLICATIVE:
                qg = tl.load(qg_ptr + unit, mask=live, other=0.0)
                qu = tl.load(qu_ptr + unit, mask=live, other=0.0)
            elif SIZED:
                scale = tl.load(unit_scale + unit, mask=live, other=0.0)
            hd_u = _hd(old_u, s, qg, qu, scale, beta_u, hd_prev, w_u, MULTIPLICATIVE)
            new_u = hd_u
            if SHRINK_UNIT:  # toward the layer level, or the global one without it
                if KL >= 0:
                    new_u = _lerp(hd_u, hd_l, rho_u, RHO_U_SMALL)
                else:
                    new_u = _lerp(hd_u, hd_g, rho_u, RHO_U_SMALL)
            new_u = _clamp(new_u, lo, hi, CLAMP_LO, CLAMP_HI)
            move = hd_gate * tl.load(unit_mask + unit, mask=live, other=0.0) > 0.0
            rate_u = tl.where(move, new_u, old_u)
            tl.store(rate_unit + unit, rate_u, mask=live)
            alpha = alpha + w_u * rate_u
            if PARAM_PARENT == PARENT_UNIT:
                tl.store(out + OUT_UNITS + n_units + unit, tl.where(hd_gate > 0.0, hd_u, old_u), mask=live)
        kappa = applied * (tau_t * alpha + (1.0 - tau_t) * final_lr)
        tl.store(out + OUT_UNITS + unit, kappa, mask=live)
