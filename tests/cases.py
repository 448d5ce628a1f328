"""Optimizer configurations shared by the trajectory tests.

Each case is ``Case(name, cls, kwargs, sign)``; ``sign=-1`` flips the synthetic gradient so a
``maximize=True`` run descends the same landscape.  Hyper-gradient rates are chosen so that
rates and weights move visibly (several percent) within 10 steps; ``test_reference_oracle``
asserts that they do, so none of these comparisons is vacuous.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict

ALL_LEVELS = ("global", "layer", "unit", "param")


@dataclass(frozen=True)
class Case:
    name: str
    cls: str                      # "SGD" | "Adam" | "AdamW"
    kwargs: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    sign: float = 1.0
    weights_move: bool = True     # whether the combination weights must visibly move
    bf16: bool = False            # also run in bfloat16
    noise: float = 1.0            # GradFn noise factor

    def __str__(self):
        return self.name


# The paper's additive rule unless a case names another: these hypergrad_lr values are its
# (the default rule is the multiplicative one since issue 20; its cases pass it too).
SGD = dict(lr=0.05, hypergrad_lr=1e-5, hypergrad_rule="additive")
ADAM = dict(lr=0.01, hypergrad_lr=3e-6, hypergrad_rule="additive")
ADAMW = dict(lr=0.01, hypergrad_lr=3e-6, weight_decay=0.1, hypergrad_rule="additive")
BASE = {"SGD": SGD, "Adam": ADAM, "AdamW": ADAMW}


def C(name, cls, sign=1.0, weights_move=True, bf16=False, noise=1.0, **kw):
    d = dict(BASE[cls])
    d.update(kw)
    return Case(name, cls, d, sign, weights_move, bf16, noise)


OPTION_CASES = [
    # ---------------------------------------------------------------- SGD
    C("sgd-default", "SGD", bf16=True),
    C("sgd-momentum", "SGD", momentum=0.9),
    C("sgd-momentum-dampening", "SGD", momentum=0.9, dampening=0.3),
    C("sgd-nesterov", "SGD", momentum=0.9, nesterov=True, bf16=True),
    C("sgd-weight-decay", "SGD", weight_decay=0.1),
    C("sgd-maximize", "SGD", sign=-1.0, maximize=True),
    C("sgd-multiplicative", "SGD", hypergrad_rule="multiplicative", hypergrad_lr=0.05,
      combination_lr=2.0, levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("sgd-multiplicative-nesterov", "SGD", hypergrad_rule="multiplicative", hypergrad_lr=0.05,
      momentum=0.9, nesterov=True, combination_lr=2.0),
    C("sgd-multiplicative-dict", "SGD", hypergrad_rule="multiplicative",
      hypergrad_lr={"global": 0.05, "layer": 0.1, "unit": 0.02, "param": 0.08},
      levels=ALL_LEVELS, combination_lr=2.0, init_weights=(4, 3, 2, 1)),
    C("sgd-scaling-none", "SGD", hypergrad_scaling="none",
      hypergrad_lr={"global": 1e-5, "layer": 1e-4, "unit": 3e-4, "param": 1.5e-3},
      levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("sgd-hypergrad-dict", "SGD", hypergrad_lr={"global": 2e-5, "unit": 5e-6}),
    C("sgd-combination-lr", "SGD", combination_lr=0.05, levels=("layer", "param"),
      init_weights=(0.5, 0.5)),
    C("sgd-shrink-param", "SGD", levels=ALL_LEVELS, shrinkage={"param": 0.3},
      init_weights=(1, 2, 3, 4)),
    C("sgd-shrink-unit", "SGD", levels=ALL_LEVELS, shrinkage={"unit": 0.3},
      init_weights=(1, 2, 3, 4)),
    C("sgd-shrink-layer", "SGD", levels=ALL_LEVELS, shrinkage={"layer": 0.3},
      init_weights=(1, 2, 3, 4)),
    C("sgd-shrink-all", "SGD", levels=("param", "layer", "unit", "global"),
      shrinkage={"layer": 0.4, "unit": 0.5, "param": 0.2}, init_weights=(1, 2, 3, 4)),
    C("sgd-shrink-param-to-layer", "SGD", levels=("param", "layer"), shrinkage={"param": 0.4},
      init_weights=(0.3, 0.7)),
    C("sgd-shrink-param-to-global", "SGD", levels=("global", "param"), shrinkage={"param": 0.6},
      init_weights=(0.3, 0.7)),
    C("sgd-shrink-unit-to-global", "SGD", levels=("unit", "global"), shrinkage={"unit": 0.5},
      init_weights=(0.3, 0.7)),
    # noisy gradients and a big beta: without bounds some rates go negative, with the
    # default bounds the clamp at 0 binds (checked in test_reference_oracle)
    C("sgd-bounds-none", "SGD", rate_bounds=None, hypergrad_lr=3e-4, noise=3.0,
      levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("sgd-bounds-default", "SGD", hypergrad_lr=3e-4, noise=3.0,
      levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("sgd-bounds-lohi", "SGD", rate_bounds=(0.045, 0.056), hypergrad_lr=1e-4,
      levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("sgd-bounds-hi-only", "SGD", rate_bounds=(None, 0.056), hypergrad_lr=1e-4,
      levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("sgd-hd-decay", "SGD", hd_decay=0.1, final_lr=0.02),
    C("sgd-hd-decay-default-final", "SGD", hd_decay=0.1, momentum=0.5),
    C("sgd-init-weights", "SGD", levels=("global", "layer", "unit"), init_weights=(1, 2, 5)),
    # ---------------------------------------------------------------- Adam
    C("adam-default", "Adam", bf16=True),
    C("adam-weight-decay", "Adam", weight_decay=0.1),
    C("adam-decoupled", "Adam", weight_decay=0.1, decoupled_weight_decay=True),
    C("adam-maximize", "Adam", sign=-1.0, maximize=True),
    C("adam-betas-eps", "Adam", betas=(0.8, 0.99), eps=1e-3),
    C("adam-multiplicative", "Adam", hypergrad_rule="multiplicative", hypergrad_lr=0.05,
      combination_lr=2.0, levels=ALL_LEVELS, init_weights=(1, 2, 3, 4), bf16=True),
    C("adam-scaling-none", "Adam", hypergrad_scaling="none",
      hypergrad_lr={"global": 3e-6, "layer": 3e-5, "unit": 1e-4, "param": 4e-4},
      levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("adam-hypergrad-dict", "Adam", hypergrad_lr={"global": 5e-6, "unit": 1e-6}),
    C("adam-combination-lr", "Adam", combination_lr=0.3),
    C("adam-shrink", "Adam", levels=ALL_LEVELS, shrinkage={"param": 0.2, "layer": 0.5},
      init_weights=(1, 2, 3, 4)),
    C("adam-bounds-none", "Adam", rate_bounds=None, hypergrad_lr=1e-4, noise=3.0,
      levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("adam-bounds-default", "Adam", hypergrad_lr=1e-4, noise=3.0,
      levels=ALL_LEVELS, init_weights=(1, 2, 3, 4)),
    C("adam-bounds-lohi", "Adam", rate_bounds=(0.009, 0.0105), hypergrad_lr=3e-5),
    C("adam-hd-decay", "Adam", hd_decay=0.2, final_lr=0.003),
    C("adam-init-weights", "Adam", levels=("layer", "global"), init_weights=(3.0, 1.0)),
    # a short beta2 lets v fall after a large gradient, so vmax > v binds (test_amsgrad_cases_bind);
    # the param level reads u_prev inside the fused pass, the coarse ones in the reduction
    C("adam-amsgrad", "Adam", amsgrad=True, levels=ALL_LEVELS, init_weights=(1, 2, 3, 4), betas=(0.9, 0.9)),
    C("adam-amsgrad-mult", "Adam", amsgrad=True, hypergrad_rule="multiplicative", hypergrad_lr=0.05,
      combination_lr=2.0, levels=ALL_LEVELS, init_weights=(1, 2, 3, 4), betas=(0.8, 0.9)),
    # ---------------------------------------------------------------- AdamW
    C("adamw-default", "AdamW", bf16=True),
    C("adamw-class-default-wd", "AdamW", weight_decay=1e-2),
    C("adamw-maximize-mult", "AdamW", sign=-1.0, weights_move=False, maximize=True,
      hypergrad_rule="multiplicative",
      hypergrad_lr=0.05, combination_lr=2.0),
    C("adamw-hd-decay-shrink", "AdamW", hd_decay=0.1, final_lr=0.005, levels=ALL_LEVELS,
      shrinkage={"unit": 0.3}, init_weights=(1, 2, 3, 4)),
    C("adamw-amsgrad", "AdamW", amsgrad=True, betas=(0.8, 0.8), bf16=True),
]

# every option case name must be unique
assert len({c.name for c in OPTION_CASES}) == len(OPTION_CASES)

SUBSETS = [tuple(s) for r in range(1, 5) for s in itertools.combinations(ALL_LEVELS, r)]
assert len(SUBSETS) == 15


def subset_cases():
    out = []
    for cls in ("SGD", "Adam", "AdamW"):
        for levels in SUBSETS:
            K = len(levels)
            kw = dict(levels=levels)
            if cls != "AdamW":
                kw["init_weights"] = tuple(range(1, K + 1))
            name = f"{cls.lower()}-{'+'.join(levels)}"
            # AdamW runs keep the default (uniform) init weights, which barely move
            moves = K > 1 and (cls != "AdamW" or levels == ("global", "unit"))
            out.append(C(name, cls, weights_move=moves, **kw))
    return out


SUBSET_CASES = subset_cases()

# a handful that slow backends run
LIGHT_CASE_NAMES = {"sgd-default", "sgd-nesterov", "adam-default", "adamw-default",
                    "sgd-multiplicative", "sgd-shrink-all", "sgd-bounds-lohi", "adam-hd-decay",
                    "adam-amsgrad"}
