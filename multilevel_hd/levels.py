"""The level stage shared by the fast backends: unit sums in, new rates and weights out.

A fast step is three stages (see ARCHITECTURE in README): a reduction pass over the
elements writes per-unit sums, this stage turns them into the new coarse rates
(global, layer, unit) and weights, and an elementwise pass applies the step. This stage
touches arrays of one entry per unit; here it is written with torch operations that never
read a value on the host: the skip and "t >= 2" decisions are 0-d bool device tensors, and
updates are selected with `where` so that sums made non-finite by a bad gradient never
leak into the state of a skipped step. The torch backend and sharded groups run it; the
triton, cpp and cuda backends run the same math as kernels of their own
(kernels/level_stage.py; csrc/levels.h), which tests/test_level_stage.py holds to this one.

The param level has one rate per element, so its HD update happens in the elementwise
pass; this stage hands that pass the scalars and the per-unit parent values it needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed

from .hierarchy import StepPlan
from .options import MAX_UNNORMALISED_WEIGHT, is_one
from .state import GROUP_RATE_KEYS, GroupJob, record_applied_rates

COARSE_LEVELS = ("global", "layer", "unit")


@dataclass
class UnitSums:
    """What the reduction pass produces for one group (zeros for units that do not step).

    s, qg, qu: per unit, the sums of g*u_prev, g^2 and u_prev^2 (qg and qu only for the
    multiplicative rule). param_dot, param_sq: sum over the group of
    alpha_param_old * g * u_prev and of (alpha_param_old * g)^2 (for the weights; only
    when the param level is one of several). finite: 0-d bool, False when any g is NaN/Inf.
    """

    s: torch.Tensor
    qg: Optional[torch.Tensor] = None
    qu: Optional[torch.Tensor] = None
    param_dot: Optional[torch.Tensor] = None
    param_sq: Optional[torch.Tensor] = None
    finite: Optional[torch.Tensor] = None


@dataclass
class StepCoefficients:
    """What the elementwise pass needs from the level stage (all device tensors).

    gate: 1 if the step proceeds, 0 if it is skipped. hd_gate: 1 if rates move (t >= 2).
    kappa_units: per unit, gate * lr_scale * (tau_t * sum over coarse levels of w_k alpha_k
    + (1 - tau_t) * final_lr), the applied rate when there is no param level. param_kappa:
    gate * lr_scale * tau_t * w_param, so kappa_e = kappa_units[unit(e)] + param_kappa *
    alpha_param_new[e]. param_hd: the param level's HD coefficient: additive
    beta * N/1 * lr_scale_{t-1} * tau_{t-1} * w_param, multiplicative beta * w_param. param_parent: per unit (or 0-d for a global parent), the
    HD-updated unshrunk parent rate that param-level shrinkage pulls toward.
    """

    gate: torch.Tensor
    hd_gate: torch.Tensor
    kappa_units: torch.Tensor
    param_kappa: Optional[torch.Tensor] = None
    param_hd: Optional[torch.Tensor] = None
    param_parent: Optional[torch.Tensor] = None


_SUM_BLOCK = 4096


def ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over its last dimension in an order that does not depend on the thread count:
    a long reduction is split among threads, so sum fixed blocks (one row each) and then the
    few block sums. The rows of a matrix are summed alike, in one pass for all of them."""
    if x.shape[-1] <= _SUM_BLOCK:  # one block, which no thread count splits
        return x.sum(-1)
    pad = (-x.shape[-1]) % _SUM_BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(*x.shape[:-1], -1, _SUM_BLOCK).sum(-1).sum(-1)


def _ordered_sums(rows: dict) -> dict:
    """{name: ordered_sum(row)} for rows of one length, in one pass over them all."""
    if len(rows) == 1:
        return {name: ordered_sum(row) for name, row in rows.items()}
    return dict(zip(rows, ordered_sum(torch.stack(list(rows.values()))).unbind()))


def _per_unit(level: str, values: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """A coarse level's values indexed by unit (global stays 0-d and broadcasts)."""
    if level == "layer":
        return values[plan.layer_of_unit(values.device)]
    return values


def _layer_sums(plan: StepPlan, sums: UnitSums, names: tuple) -> dict:
    """The layers' sums of the per-unit sums `names` ("s", "qg", "qu"), all in one segment
    sum: in float64, as the compiled level stages add a layer's units (segment_reduce adds
    them one after another, which in float32 is off by 5e-6 for a layer of 300k units;
    .sum() would be by 5e-8)."""
    columns = torch.stack([getattr(sums, name) for name in names], dim=1).double()
    out = torch.segment_reduce(columns, "sum", lengths=plan.units_per_layer(columns.device))
    return dict(zip(names, out.to(sums.s.dtype).unbind(1)))


def update_levels(job: GroupJob, sums: UnitSums) -> StepCoefficients:
    """docs/algorithm.md steps 2 (the counters), 3-4 (coarse rates and weights) and the coarse part of 6.

    Every right-hand side is an old value, and the group state is written in place once all
    of them have been read (so nothing is cloned); on a small model this stage's ATen
    operations, not its arithmetic, are its cost, hence the stacked sums and the few writes."""
    opts, plan, gs = job.opts, job.plan, job.group_state
    device, acc = gs["weights"].device, gs["weights"].dtype
    multiplicative = opts.rule == "multiplicative"
    coarse = [lv for lv in COARSE_LEVELS if lv in opts.levels]
    names = ("s", "qg", "qu") if multiplicative else ("s",)
    layer = _layer_sums(plan, sums, names) if "layer" in coarse else {}
    old = {lv: gs[GROUP_RATE_KEYS[lv]] for lv in coarse}
    w = gs["weights"]
    totals, proceeds = _group_totals(job, sums, old, layer, _local_gate(job, sums))

    def level_sums(level, name):  # S_k ("s"), Qg_k ("qg") or Qu_k ("qu"); all-reduced ones from totals
        if level == "unit":
            return getattr(sums, name)
        return totals.get(f"{name}_{level}", layer.get(name))

    if proceeds is None:  # nothing can skip the step
        proceeds = torch.ones((), dtype=torch.bool, device=device)
    else:
        gs["skipped"].add_(~proceeds)
    gate = proceeds.to(acc)
    gs["step"].add_(gate)
    t = gs["step"]
    rates_move = proceeds & (t >= 2)
    hd_gate = rates_move.to(acc)
    # d kappa_{t-1} / d alpha_k = lr_scale_{t-1} * tau_{t-1} * w_k: the chain rule through
    # the rate the last step applied, LR scheduler factor included. hd_decay is an option:
    # at 0, tau is 1 at every step and costs nothing.
    if opts.hd_decay == 0:
        tau_t, hd_prev = 1.0, gs["lr_scale"]
    else:
        tau_t = torch.exp(-opts.hd_decay * t)
        hd_prev = gs["lr_scale"] * torch.exp(-opts.hd_decay * (t - 1))
    w_of = dict(zip(opts.levels, w.unbind()))
    zero = plan.zero(device, acc)

    def size_scale(level):  # N / N_k[j], with N counted over every rank of a sharded group
        if "n" not in totals:
            return plan.size_scale(level, device, acc)
        sizes = plan.sizes(level, device, acc)
        return torch.where(sizes > 0, totals["n"] / sizes.clamp(min=1), 0.0)

    hd = {}
    for level in coarse:
        beta, s = opts.hypergrad_lr[level], level_sums(level, "s")
        if multiplicative:  # alpha (1 + beta w_k cos)
            prod = level_sums(level, "qg") * level_sums(level, "qu")
            cos = torch.where(prod > 0, s / prod.sqrt(), zero)
            hd[level] = torch.addcmul(old[level], old[level], cos * w_of[level], value=beta)
        else:  # alpha + beta hd_prev w_k (N / N_k) S
            factor = w_of[level] * hd_prev
            if opts.scaling == "size" and level != "global":  # global: N / N = 1
                factor = factor * size_scale(level)
            hd[level] = torch.addcmul(old[level], factor, s, value=beta)

    new = dict(hd)
    for level, rho in opts.shrinkage.items():
        if level != "param":
            parent = hd[opts.parents[level]]
            if level == "unit":
                parent = _per_unit(opts.parents[level], parent, plan)
            new[level] = torch.lerp(hd[level], parent.expand_as(hd[level]), rho)
    if opts.rate_bounds is not None and opts.rate_bounds != (None, None):
        lo, hi = opts.rate_bounds
        new = {lv: r.clamp(min=lo, max=hi) for lv, r in new.items()}

    if opts.multi_level:
        a_dot_s = totals["a_dot_s"]  # per level: sum_j alpha_old S_j
        if multiplicative:  # R_k = sum_e (alpha_old g)^2 and U = sum_e u_prev^2
            denom = (totals["r_sq"] * totals["qu_global"]).sqrt()
            new_w = torch.addcmul(w, w, torch.where(denom > 0, a_dot_s / denom, zero), value=opts.combination_lr)
        else:
            new_w = torch.addcmul(w, hd_prev, a_dot_s, value=opts.combination_lr)
        new_w = new_w.clamp(min=0, max=MAX_UNNORMALISED_WEIGHT)
        total = new_w.sum()
        new_w = torch.where(total > 0, new_w / total, 1.0 / len(opts.levels))

    param_parent = None
    if "param" in opts.shrinkage:  # finite even when a bad gradient skips the step
        parent = opts.parents["param"]
        param_parent = _per_unit(parent, torch.where(rates_move, hd[parent], old[parent]), plan)

    # The writes. Units and layers of tensors that do not step keep their rates (their sums
    # are zero, but shrinkage and the clamp would still move them).
    for level in coarse:
        moves = plan.moves(level, device)
        moves = rates_move if moves is None else moves & rates_move
        torch.where(moves, new[level], old[level], out=old[level])
    stepped = plan.moves("layer", device)
    record_applied_rates(opts, gs, proceeds if stepped is None else stepped & proceeds, tau_t, w)

    # sum over the coarse levels of w_k alpha_k, per unit (0 with the param level alone)
    alpha_coarse = None if coarse else torch.zeros((), dtype=acc, device=device)
    for lv in coarse:
        rate = _per_unit(lv, old[lv], plan)  # (now the new rates)
        alpha_coarse = rate * w_of[lv] if alpha_coarse is None else torch.addcmul(alpha_coarse, rate, w_of[lv])
    applied = gate if is_one(opts.lr_scale) else gate * opts.lr_scale
    # kappa = lr_scale * (tau_t * alpha* + (1 - tau_t) * final_lr)
    kappa = alpha_coarse if is_one(tau_t) else tau_t * alpha_coarse + (1 - tau_t) * opts.final_lr
    coeffs = StepCoefficients(gate=gate, hd_gate=hd_gate, kappa_units=(applied * kappa).expand(plan.layout.num_units))
    if "param" in opts.levels:
        beta, w_param = opts.hypergrad_lr["param"], w_of["param"]
        coeffs.param_kappa = applied * w_param if is_one(tau_t) else applied * tau_t * w_param
        if multiplicative:
            coeffs.param_hd = beta * w_param
        else:
            n = totals.get("n", plan.num_elements) if opts.scaling == "size" else 1
            coeffs.param_hd = beta * n * hd_prev * w_param
        coeffs.param_parent = param_parent

    if opts.multi_level:  # last: the weights and lr_scale (hd_prev) were read above
        torch.where(rates_move, new_w, w, out=w)
    if isinstance(opts.lr_scale, torch.Tensor):
        torch.where(proceeds, opts.lr_scale, gs["lr_scale"], out=gs["lr_scale"])
    else:  # (masked_fill_ with a tensor value reads it on the host on CUDA)
        gs["lr_scale"].masked_fill_(proceeds, opts.lr_scale)
    return coeffs


def _local_gate(job: GroupJob, sums: UnitSums) -> Optional[torch.Tensor]:
    """0-d bool: False when this rank has a reason to skip the step (a NaN/Inf gradient,
    GradScaler's found_inf); None when neither guard is on."""
    flags = []
    if job.opts.skip_nonfinite:
        flags.append(sums.finite)
    if job.found_inf is not None:
        flags.append(~(job.found_inf.to(job.group_state["weights"].device) > 0))  # (a NaN found_inf steps)
    return flags[0] & flags[1] if len(flags) == 2 else (flags[0] if flags else None)


def _group_totals(job: GroupJob, sums: UnitSums, old: dict, layer: dict, proceeds) -> tuple:
    """The sums that span the tensors of the group, as 0-d (or [K]) tensors: "s_global",
    "qg_global", "qu_global", "a_dot_s" and "r_sq" (per level, for the weights) and, for a
    sharded group, "n" (elements with a gradient); and whether the step proceeds (0-d bool,
    or None if nothing can skip it). The unit-long ones are summed in one stacked sum.

    With a `sharding_group` each rank holds some of the group's tensors, and these are
    the only quantities of a step that need the others' elements: one all-reduce of one
    small vector makes every rank's rates and weights the same as an unsharded run's (and
    every rank skips if one must: "bad" counts the ranks that would).
    When the ranks hold rows of the same tensors (`job.shards_rows`, FSDP2), the layers'
    sums "s_layer" (and "qg_layer", "qu_layer") join that vector. ("a_dot_s" and "r_sq"
    are linear in the sums, so the ranks' local terms add up to the whole group's.)
    """
    opts, gs = job.opts, job.group_state
    device, acc = gs["weights"].device, gs["weights"].dtype
    multiplicative = opts.rule == "multiplicative"
    rows = {"s_global": sums.s}
    if multiplicative:
        rows["qg_global"], rows["qu_global"] = sums.qg, sums.qu
    if opts.multi_level and "unit" in opts.levels:  # sum_j alpha_old S_j (and sum_j alpha_old^2 Qg_j)
        rows["a_dot_s_unit"] = old["unit"] * sums.s
        if multiplicative:
            rows["r_sq_unit"] = old["unit"].square() * sums.qg
    totals = _ordered_sums(rows)
    if opts.multi_level:
        if "global" in opts.levels:
            totals["a_dot_s_global"] = old["global"] * totals["s_global"]
            if multiplicative:
                totals["r_sq_global"] = old["global"].square() * totals["qg_global"]
        if "layer" in opts.levels:  # over the layers' sums, in one stacked sum too
            rows = {"a_dot_s_layer": old["layer"] * layer["s"]}
            if multiplicative:
                rows["r_sq_layer"] = old["layer"].square() * layer["qg"]
            totals.update(_ordered_sums(rows))
        if "param" in opts.levels:
            totals["a_dot_s_param"] = sums.param_dot
            if multiplicative:
                totals["r_sq_param"] = sums.param_sq
        totals["a_dot_s"] = torch.stack([totals.pop(f"a_dot_s_{lv}") for lv in opts.levels]).to(acc)
        if multiplicative:
            totals["r_sq"] = torch.stack([totals.pop(f"r_sq_{lv}") for lv in opts.levels]).to(acc)
    if job.sharding_group is None:
        return totals, proceeds
    totals["n"] = torch.full((), job.plan.num_elements, dtype=acc, device=device)
    if proceeds is not None:
        totals["bad"] = (~proceeds).to(acc)
    if job.shards_rows and "layer" in opts.levels:
        for name, value in layer.items():
            totals[f"{name}_layer"] = value
    names = list(totals)
    flat = torch.cat([totals[name].reshape(-1) for name in names])
    torch.distributed.all_reduce(flat, group=job.sharding_group)
    out, offset = {}, 0
    for name in names:
        size = totals[name].numel()
        out[name] = flat[offset : offset + size].reshape(totals[name].shape)
        offset += size
    return out, (out.pop("bad") == 0 if proceeds is not None else None)
