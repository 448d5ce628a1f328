"""The level stage shared by the fast backends: unit sums in, new rates and weights out.

A fast step is three stages (see ARCHITECTURE in README): a reduction pass over the
elements writes per-unit sums, this stage turns them into the new coarse rates
(global, layer, unit) and weights, and an elementwise pass applies the step. This stage
touches arrays of one entry per unit; here it is written with torch operations that never
read a value on the host: the skip and "t >= 2" decisions are 0/1 device tensors, and
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
from .options import MAX_UNNORMALISED_WEIGHT
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
    """x.sum() in an order that does not depend on the thread count: a long reduction is
    split among threads, so sum fixed blocks (one row each) and then the few block sums."""
    pad = (-x.numel()) % _SUM_BLOCK
    return torch.nn.functional.pad(x, (0, pad)).view(-1, _SUM_BLOCK).sum(1).sum()


def _per_unit(level: str, values: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """A coarse level's values indexed by unit (global stays 0-d and broadcasts)."""
    if level == "layer":
        return values[plan.layer_of_unit(values.device)]
    return values


def update_levels(job: GroupJob, sums: UnitSums) -> StepCoefficients:
    """docs/algorithm.md steps 2 (the counters), 3-4 (coarse rates and weights) and the coarse part of 6."""
    opts, plan, gs = job.opts, job.plan, job.group_state
    device, acc = gs["weights"].device, gs["weights"].dtype
    multiplicative = opts.rule == "multiplicative"
    k_of = {level: k for k, level in enumerate(opts.levels)}
    coarse = [lv for lv in COARSE_LEVELS if lv in opts.levels]
    layer_lengths = plan.units_per_layer(device)

    def level_sum(level, per_unit):
        if level == "unit":
            return per_unit
        if level == "layer":  # in float64, as the compiled level stages add a layer's units:
            # segment_reduce adds them one after another, which in float32 is off by 5e-6
            # for a layer of 300k units (.sum() would be by 5e-8)
            return torch.segment_reduce(per_unit.double(), "sum", lengths=layer_lengths).to(per_unit.dtype)
        return ordered_sum(per_unit)

    old = {lv: gs[GROUP_RATE_KEYS[lv]].clone() for lv in coarse}
    totals = _group_totals(job, sums, old, level_sum)

    def level_sums(level, name):  # S_k ("s"), Qg_k ("qg") or Qu_k ("qu"); all-reduced ones from totals
        reduced = totals.get(f"{name}_{level}")
        return reduced if reduced is not None else level_sum(level, getattr(sums, name))

    gate = (totals["bad"] == 0).to(acc)
    gs["skipped"].add_((1 - gate).to(torch.int64))
    gs["step"].add_(gate)
    t = gs["step"]
    hd_gate = gate * (t >= 2)
    tau_t = torch.exp(-opts.hd_decay * t)
    # d kappa_{t-1} / d alpha_k = lr_scale_{t-1} * tau_{t-1} * w_k: the chain rule through
    # the rate the last step applied, LR scheduler factor included.
    hd_prev = gs["lr_scale"] * torch.exp(-opts.hd_decay * (t - 1))
    w = gs["weights"].clone()  # the old weights: every right-hand side uses them

    def size_scale(level):  # N / N_k[j], with N counted over every rank of a sharded group
        if "n" not in totals:
            return plan.size_scale(level, device, acc)
        sizes = plan.sizes(level, device, acc)
        return torch.where(sizes > 0, totals["n"] / sizes.clamp(min=1), 0.0)

    hd = {}
    for level in coarse:
        k, beta = k_of[level], opts.hypergrad_lr[level]
        s = level_sums(level, "s")
        if multiplicative:
            prod = level_sums(level, "qg") * level_sums(level, "qu")
            cos = torch.where(prod > 0, s / prod.sqrt(), 0.0)
            hd[level] = old[level] * (1 + beta * w[k] * cos)
        else:
            sized = opts.scaling == "size" and level != "global"  # global: N / N = 1
            scale = size_scale(level) if sized else 1.0
            hd[level] = old[level] + (beta * hd_prev * w[k]) * scale * s

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
            new_w = w * torch.where(denom > 0, 1 + opts.combination_lr * a_dot_s / denom, 1.0)
        else:
            new_w = w + opts.combination_lr * hd_prev * a_dot_s
        new_w = new_w.clamp(min=0, max=MAX_UNNORMALISED_WEIGHT)
        total = new_w.sum()
        new_w = torch.where(total > 0, new_w / total, 1.0 / len(opts.levels))
        gs["weights"].copy_(torch.where(hd_gate > 0, new_w, w))

    # Units and layers of tensors that do not step keep their rates (their sums are zero,
    # but shrinkage and the clamp would still move them).
    masks = {"global": 1.0, "layer": plan.layer_mask(device, acc), "unit": plan.unit_mask(device, acc)}
    for level in coarse:
        move = (hd_gate * masks[level]) > 0
        gs[GROUP_RATE_KEYS[level]].copy_(torch.where(move, new[level], old[level]))
    gs["lr_scale"].copy_(torch.where(gate > 0, opts.lr_scale, gs["lr_scale"]))
    record_applied_rates(opts, gs, (plan.layer_mask(device, acc) * gate) > 0, tau_t, w)

    alpha_coarse = sum(
        (w[k_of[lv]] * _per_unit(lv, gs[GROUP_RATE_KEYS[lv]], plan) for lv in coarse),
        torch.zeros((), dtype=acc, device=device),
    )
    applied = gate * opts.lr_scale  # kappa = lr_scale * (tau_t * alpha* + (1 - tau_t) * final_lr)
    kappa_units = (applied * (tau_t * alpha_coarse + (1 - tau_t) * opts.final_lr)).expand(plan.layout.num_units)
    coeffs = StepCoefficients(gate=gate, hd_gate=hd_gate, kappa_units=kappa_units)
    if "param" in opts.levels:
        k, beta = k_of["param"], opts.hypergrad_lr["param"]
        coeffs.param_kappa = applied * tau_t * w[k]
        if multiplicative:
            coeffs.param_hd = beta * w[k]
        else:
            n = totals.get("n", plan.num_elements) if opts.scaling == "size" else 1
            coeffs.param_hd = beta * n * hd_prev * w[k]
        if "param" in opts.shrinkage:  # finite even when a bad gradient skips the step
            parent = opts.parents["param"]
            coeffs.param_parent = _per_unit(parent, torch.where(hd_gate > 0, hd[parent], old[parent]), plan)
    return coeffs


def _group_totals(job: GroupJob, sums: UnitSums, old: dict, level_sum) -> dict:
    """The sums that span the tensors of the group, as 0-d (or [K]) tensors: "bad" (> 0
    skips the step), "s_global", "qg_global", "qu_global", "a_dot_s" and "r_sq" (per level,
    for the weights) and, for a sharded group, "n" (elements with a gradient).

    With a `sharding_group` each rank holds some of the group's tensors, and these are
    the only quantities of a step that need the others' elements: one all-reduce of one
    small vector makes every rank's rates and weights the same as an unsharded run's.
    When the ranks hold rows of the same tensors (`job.shards_rows`, FSDP2), the layers'
    sums "s_layer" (and "qg_layer", "qu_layer") join that vector. ("a_dot_s" and "r_sq"
    are linear in the sums, so the ranks' local terms add up to the whole group's.)
    """
    opts, gs = job.opts, job.group_state
    device, acc = gs["weights"].device, gs["weights"].dtype
    multiplicative = opts.rule == "multiplicative"
    bad = torch.zeros((), dtype=acc, device=device)
    if opts.skip_nonfinite:
        bad = bad + (~sums.finite).to(acc)
    if job.found_inf is not None:
        bad = bad + (job.found_inf.to(device=device, dtype=acc) > 0).to(acc)
    totals = {"bad": bad, "s_global": ordered_sum(sums.s)}
    if multiplicative:
        totals["qg_global"], totals["qu_global"] = ordered_sum(sums.qg), ordered_sum(sums.qu)
    if opts.multi_level:
        a_dot_s, r_sq = [], []
        for level in opts.levels:
            if level == "param":
                a_dot_s.append(sums.param_dot)
                r_sq.append(sums.param_sq)
            else:
                s = totals["s_global"] if level == "global" else level_sum(level, sums.s)
                a_dot_s.append(ordered_sum((old[level] * s).reshape(-1)))
                if multiplicative:
                    qg = totals["qg_global"] if level == "global" else level_sum(level, sums.qg)
                    r_sq.append(ordered_sum((old[level] ** 2 * qg).reshape(-1)))
        totals["a_dot_s"] = torch.stack(a_dot_s).to(acc)
        if multiplicative:
            totals["r_sq"] = torch.stack(r_sq).to(acc)
    if job.sharding_group is None:
        return totals
    totals["n"] = torch.full((), job.plan.num_elements, dtype=acc, device=device)
    if job.shards_rows and "layer" in opts.levels:
        totals["s_layer"] = level_sum("layer", sums.s)
        if multiplicative:
            totals["qg_layer"], totals["qu_layer"] = level_sum("layer", sums.qg), level_sum("layer", sums.qu)
    names = list(totals)
    flat = torch.cat([totals[name].reshape(-1) for name in names])
    torch.distributed.all_reduce(flat, group=job.sharding_group)
    out, offset = {}, 0
    for name in names:
        size = totals[name].numel()
        out[name] = flat[offset : offset + size].reshape(totals[name].shape)
        offset += size
    return out
