"""Option validation and resolution for one param group (docs/algorithm.md section 4).

`resolve` turns a group's raw options (with their `None` defaults) into the numbers one step
uses, and raises for any bad one with a message that names it: the optimizer runs it when a
group is added and again before a step whose options changed, so bad input fails before
anything moves. Exception types follow torch.optim: TypeError for an option of the wrong type,
ValueError for a bad value. Every backend reads only `GroupOptions`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .hierarchy import LEVELS

RULES = ("additive", "multiplicative")
SCALINGS = ("size", "none")
BACKEND_NAMES = ("auto", "triton", "cuda", "cpp", "torch", "reference")
DEFAULT_LEVELS = ("global", "unit")
PAPER_CONV_WEIGHTS = (0.8, 0.2)  # the paper's filter+global setting, in DEFAULT_LEVELS order
DEFAULT_ADDITIVE_BETA = {"adam": 1e-8, "sgd": 1e-6}  # the paper's ResNet settings
# Baydin et al.'s HDM example used 0.02; the lr-robustness study (bench/results/
# digits_robustness_table.md: 5 lrs over 3 decades x 3 models x 3 seeds) chose 0.05, whose
# worst case over the grid beat 0.02's (Adam, global+unit: 36.9 % against 26.6 %; SGDN 12.3 %
# against 10.1 %) and the paper's additive settings' (22.6 %, 5.9 %), with no run diverged.
DEFAULT_MULTIPLICATIVE_BETA = 0.05
NESTEROV_MESSAGE = "Nesterov momentum requires a momentum and zero dampening"  # torch.optim.SGD's

# The default rule (docs/algorithm.md section 4, "Why these defaults"; README, "The
# defaults", measured by tests/schedule_study.py). The additive rule's step does not scale
# with the rate: its relative pace is beta * S / lr, so at a small lr (1e-28, 1e-12) or
# under OneCycleLR (rates learned at max_lr / 25 and the step carrying the scheduler's
# factor) the rates and weights ran away, up to NaN. The multiplicative rule moves a rate by
# at most the fraction beta * w_k per step whatever the lr or the schedule (a positive rate
# stays positive and grows by at most (1 + beta)^t), so a schedule shapes the applied rate
# and nothing else.
DEFAULT_RULE = "multiplicative"
# The multiplicative rule's derived delta stays min(beta), the rates' own pace (0.05 by
# default). The weights' step `w_k (1 + delta cos_k)` moves them only through the
# difference between the levels' cosines (a common factor cancels in w / sum(w)), so they
# move little under any delta: the lr-robustness study measured delta 0.02, 0.1 and 0.5 with
# beta 0.05 (Adam, worst cases 36.9, 36.9 and 37.0 %; weights 0.80 / 0.20 to 0.74 / 0.26 at
# the end) and the library defaults' row with delta = beta = 0.05.
# The additive rule's derived delta `min(beta) / lr**2` overflows float32 below lr ~ 1e-23
# (and the division itself below ~1e-154); it is capped at float32's largest number, so
# that it reaches the float32 kernels finite and is what it was wherever it did.
FLOAT32_MAX = torch.finfo(torch.float32).max
MAX_DERIVED_COMBINATION_LR = FLOAT32_MAX
# Before they are normalised the weights are clamped into [0, MAX_UNNORMALISED_WEIGHT]: a
# weight step that overflows (an explicit additive delta at a tiny lr) would give inf / inf =
# NaN weights; capped, the sum of up to four weights stays finite in float32. Every backend's
# level stage applies it (csrc/levels.h and kernels/level_stage.py write the same constant).
MAX_UNNORMALISED_WEIGHT = FLOAT32_MAX / 4


@dataclass(frozen=True)
class GroupOptions:
    """Everything one step of one param group needs, with defaults resolved."""

    kind: str  # "sgd" or "adam"
    levels: tuple[str, ...]
    lr: float  # the base lr: where rates start; an LR scheduler's `initial_lr`
    lr_scale: float  # the group's lr now over the base lr: what a scheduler multiplies kappa by
    final_lr: float
    weight_decay: float
    decoupled_weight_decay: bool
    maximize: bool
    momentum: float
    dampening: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool  # Adam: u from the running maximum of v (max_exp_avg_sq), as torch.optim.Adam
    hypergrad_lr: dict  # level -> beta_k
    combination_lr: float  # delta
    rule: str
    scaling: str
    shrinkage: dict  # level -> rho, only for active levels that have an active parent
    parents: dict  # level -> next coarser active level (absent for the coarsest)
    rate_bounds: Optional[tuple]  # (lo or None, hi or None), or None: no clamp
    hd_decay: float
    skip_nonfinite: bool
    init_weights: tuple[float, ...]  # normalised, in `levels` order

    @property
    def multi_level(self) -> bool:
        return len(self.levels) > 1

    @property
    def stores_direction(self) -> bool:
        """SGD keeps the last direction when it cannot be recomputed from other state."""
        return self.kind == "sgd" and (self.momentum == 0 or self.nesterov)


def is_one(x) -> bool:
    """x is the Python number 1: an option (never a tensor, whose value a branch would read
    on the host), with which a factor of it can be left out."""
    return not isinstance(x, torch.Tensor) and x == 1


def _check_real(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def _check_finite(name, value):
    """A real number that is neither NaN nor infinite: a NaN option would make NaN rates (and
    the backends' clamps disagree on a NaN bound)."""
    _check_real(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_nonnegative(name, value):
    _check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def _check_unit_interval(name, value):
    """0 <= value < 1: betas, shrinkage rho."""
    _check_finite(name, value)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")


def _comparable(name, value):
    """A real number or a tensor (torch.optim compares both); anything else is our TypeError,
    which names the option (the twin's own comparison raises a TypeError that does not)."""
    if not isinstance(value, torch.Tensor):
        _check_real(name, value)


def check_twin_options(kind: str, options: dict) -> None:
    """torch.optim.Adam's (kind "adam") or SGD's constructor checks, in its order, with its
    exception types and messages (PyTorch's own optimizer tests match on them). The optimizer
    runs them first, before its own checks (`resolve`) and before it looks at the parameters,
    so the first error a user sees is the one torch.optim would have raised."""
    lr = options["lr"]
    if isinstance(lr, torch.Tensor):
        if kind == "adam" and options["foreach"] and not options["capturable"]:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    _comparable("lr", lr)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if kind == "adam":
        betas = options["betas"]
        _comparable("eps", options["eps"])
        if not 0.0 <= options["eps"]:
            raise ValueError(f"Invalid epsilon value: {options['eps']}")
        for index, beta in enumerate(betas):
            _comparable(f"betas[{index}]", beta)
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        _comparable("weight_decay", options["weight_decay"])
        if not 0.0 <= options["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {options['weight_decay']}")
        if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, torch.Tensor) for b in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor):
                if not options["capturable"] and options["foreach"]:
                    raise ValueError(
                        f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True"
                    )
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{index}] must be 1-element")
    else:
        for name in ("momentum", "weight_decay"):
            _comparable(name, options[name])
            if options[name] < 0.0:
                raise ValueError(f"Invalid {name} value: {options[name]}")
        if options["nesterov"] and (options["momentum"] <= 0 or options["dampening"] != 0):
            raise ValueError(NESTEROV_MESSAGE)


def lr_scale(lr, base_lr):
    """An LR scheduler's factor: the group's lr now over its base lr. For a base of 0 it is 0
    while the lr is 0 (the group is frozen, as in torch.optim, whatever its rates would
    learn) and 1 once a hand edit gives it an lr."""
    if base_lr > 0:
        return lr / base_lr
    return 1.0 if lr > 0 else 0.0


def _levels(group) -> tuple[str, ...]:
    levels = group["levels"]
    if isinstance(levels, str):
        raise ValueError(f"levels must be a sequence of level names, got the string {levels!r}")
    levels = tuple(levels)
    if not levels:
        raise ValueError("levels must name at least one of " + ", ".join(LEVELS))
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"unknown level(s) {unknown}; choose from {LEVELS}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels must not repeat a level, got {levels}")
    return levels


def _check_level_names(name, per_level: dict, levels) -> None:
    """A {level: value} option names only active levels: an entry for another one would be
    ignored without a word."""
    unknown = [lv for lv in per_level if lv not in LEVELS]
    if unknown:
        raise ValueError(f"{name} names unknown level(s) {unknown}; choose from {LEVELS}")
    inactive = [lv for lv in per_level if lv not in levels]
    if inactive:
        raise ValueError(f"{name} names level(s) {inactive} that are not among the group's levels {levels}")


def _per_level(name, value, levels, default):
    """A float for all levels or a {level: float} dict -> {level: float} for `levels`."""
    if isinstance(value, dict):
        _check_level_names(name, value, levels)
        out = {lv: value.get(lv, default) for lv in levels}
    else:
        out = {lv: default if value is None else value for lv in levels}
    for lv, v in out.items():
        check_nonnegative(f"{name}[{lv!r}]", v)
    return out


def resolve(group: dict, kind: str) -> GroupOptions:
    if group["backend"] not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {group['backend']!r}; choose from {BACKEND_NAMES}")
    levels = _levels(group)
    check_nonnegative("lr", group["lr"])
    # An LR scheduler (or a hand edit) changes group["lr"]; the rates learned at the base
    # lr stay, and the scheduler's factor scales the applied rate (README: LR schedulers).
    lr = group.get("initial_lr", group["lr"])
    check_nonnegative("initial_lr", lr)
    scale = lr_scale(group["lr"], lr)
    check_nonnegative("weight_decay", group["weight_decay"])
    check_nonnegative("hd_decay", group["hd_decay"])
    final_lr = lr if group["final_lr"] is None else group["final_lr"]
    check_nonnegative("final_lr", final_lr)

    rule, scaling = group["hypergrad_rule"], group["hypergrad_scaling"]
    if rule not in RULES:
        raise ValueError(f"hypergrad_rule must be one of {RULES}, got {rule!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"hypergrad_scaling must be one of {SCALINGS}, got {scaling!r}")
    default_beta = DEFAULT_ADDITIVE_BETA[kind] if rule == "additive" else DEFAULT_MULTIPLICATIVE_BETA
    beta = _per_level("hypergrad_lr", group["hypergrad_lr"], levels, default_beta)
    if rule == "multiplicative" and any(b >= 1 for b in beta.values()):
        raise ValueError(f"the multiplicative rule needs hypergrad_lr < 1, got {beta}")

    delta = group["combination_lr"]
    if delta is None:
        if rule == "multiplicative":  # 0 with hypergrad_lr=0: then exactly torch.optim
            delta = min(beta.values())
        else:  # moves the weights at the rates' relative pace; no pace to match at lr 0
            delta = min(min(beta.values()) / lr / lr, MAX_DERIVED_COMBINATION_LR) if lr > 0 else 0.0
    else:
        check_nonnegative("combination_lr", delta)

    shrink_in = group["shrinkage"] or {}
    if not isinstance(shrink_in, dict):
        raise TypeError(f"shrinkage must be a dict {{level: rho}} or None, got {shrink_in!r}")
    _check_level_names("shrinkage", shrink_in, levels)
    for lv, rho in shrink_in.items():
        _check_unit_interval(f"shrinkage rho for {lv!r}", rho)
    active = [lv for lv in LEVELS if lv in levels]  # coarse to fine
    parents = {fine: coarse for coarse, fine in zip(active, active[1:])}
    shrinkage = {lv: float(rho) for lv, rho in shrink_in.items() if lv in parents and rho > 0}

    bounds = group["rate_bounds"]
    if bounds is not None:
        if not isinstance(bounds, (tuple, list)):
            raise TypeError(f"rate_bounds must be (lo, hi) or None, got {bounds!r}")
        if len(bounds) != 2:
            raise ValueError(f"rate_bounds must be (lo, hi) or None, got {bounds!r}")
        lo, hi = bounds
        for name, bound in (("lower", lo), ("upper", hi)):
            if bound is not None:
                _check_finite(f"rate_bounds {name} bound", bound)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"rate_bounds lower bound {lo} exceeds upper bound {hi}")
        bounds = (lo, hi)

    init = group["init_weights"]
    if init is None:
        init = PAPER_CONV_WEIGHTS if levels == DEFAULT_LEVELS else (1.0,) * len(levels)
    init = tuple(init)
    if len(init) != len(levels):
        raise ValueError(f"init_weights needs {len(levels)} values (one per level), got {len(init)}")
    for v in init:
        check_nonnegative("init_weights", v)
    if not sum(init) > 0:
        raise ValueError("init_weights must have a positive sum")
    init = tuple(float(v) / sum(init) for v in init)

    if kind == "adam":
        beta1, beta2 = group["betas"]
        for name, b in (("betas[0]", beta1), ("betas[1]", beta2)):
            _check_unit_interval(name, b)
        check_nonnegative("eps", group["eps"])
        momentum = dampening = 0.0
        nesterov, eps, decoupled = False, group["eps"], group["decoupled_weight_decay"]
        amsgrad = group["amsgrad"]
    else:
        momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        check_nonnegative("momentum", momentum)
        check_nonnegative("dampening", dampening)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(NESTEROV_MESSAGE)
        beta1 = beta2 = eps = 0.0
        decoupled = amsgrad = False

    return GroupOptions(
        kind=kind, levels=levels, lr=float(lr), lr_scale=float(scale), final_lr=float(final_lr),
        weight_decay=float(group["weight_decay"]), decoupled_weight_decay=bool(decoupled),
        maximize=bool(group["maximize"]), momentum=float(momentum),
        dampening=float(dampening), nesterov=bool(nesterov), beta1=float(beta1),
        beta2=float(beta2), eps=float(eps), amsgrad=bool(amsgrad), hypergrad_lr=beta, combination_lr=float(delta),
        rule=rule, scaling=scaling, shrinkage=shrinkage, parents=parents,
        rate_bounds=bounds, hd_decay=float(group["hd_decay"]),
        skip_nonfinite=bool(group["skip_nonfinite"]), init_weights=init,
    )
