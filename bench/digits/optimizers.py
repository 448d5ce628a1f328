"""The optimizer families compared: per model, its training settings and the paper's
hyper-gradient settings (`Setting`), and every optimizer with its learning rates (`OptSpec`):
those of the comparison (`optimizer_specs`) and of the lr-robustness study (`robustness_specs`)."""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn as nn

import multilevel_hd as mlhd
from multilevel_hd.options import resolve

from .models import cifar_resnet18, feed_forward, lenet5

try:
    import prodigyopt
except ImportError:
    prodigyopt = None
try:
    import schedulefree
except ImportError:
    schedulefree = None


@dataclass(frozen=True)
class CamPreset:
    tag: str
    levels: tuple[str, ...]
    init_weights: tuple[float, ...]


@dataclass(frozen=True)
class Setting:
    """One model of the comparison, with the paper's hyper-gradient settings for it
    (PAPER.md Table 1) and where this benchmark departs from them (`note`)."""

    name: str
    build: Callable[[], nn.Module]
    image_size: int  # digits are 8x8; larger sizes are bilinear upsamplings
    epochs: int
    quick_epochs: int
    batch_size: int
    weight_decay: float
    adam_beta: float  # hypergrad_lr of the Adam family
    sgd_beta: float  # hypergrad_lr of the SGDN family
    delta: float  # combination_lr
    hd_decay: float  # the paper anneals its conv nets' rate toward lr: tau = exp(-r t)
    presets: tuple[CamPreset, ...]  # CAM-HD level sets; the first one runs in --quick
    note: str


SETTINGS = {
    s.name: s
    for s in (
        Setting(
            "ffn", feed_forward, 8, epochs=30, quick_epochs=5, batch_size=64, weight_decay=0.0,
            adam_beta=1e-7, sgd_beta=1e-6, delta=1e-2, hd_decay=0.0,
            presets=(CamPreset("l+g", ("layer", "global"), (0.5, 0.5)),
                     CamPreset("p+l+g", ("param", "layer", "global"), (0.3, 0.3, 0.4))),
            note="Table 1 (MLPs) has no SGD setting: SGDN uses the library default beta 1e-6",
        ),
        Setting(
            "lenet5", lenet5, 32, epochs=20, quick_epochs=3, batch_size=64, weight_decay=0.0,
            adam_beta=1e-8, sgd_beta=1e-6, delta=3e-2, hd_decay=2e-3,
            presets=(CamPreset("g+u", ("global", "unit"), (0.8, 0.2)),),
            note="batch 64, not 256 (1,347 training images); SGDN beta 1e-6 (the paper's ResNet "
                 "value): the paper ran no SGDN on LeNet-5, and Table 1's SGD beta 1e-3 drove the "
                 "SGDN-CAM-HD rates to 1e10 at lr 1e-2 in a trial run",
        ),
        Setting(
            "resnet18", cifar_resnet18, 16, epochs=8, quick_epochs=1, batch_size=64, weight_decay=1e-4,
            adam_beta=1e-8, sgd_beta=1e-6, delta=1e-3, hd_decay=1e-3,
            presets=(CamPreset("g+u", ("global", "unit"), (0.8, 0.2)),),
            note="width 16 (not 64), 16x16 inputs, batch 64, 8 epochs instead of 200; weight "
                 "decay 1e-4 for every optimizer; no lr schedule; BatchNorm statistics recomputed "
                 "at the final weights before evaluation",
        ),
    )
}

# Initial learning rates: the family's usual default in the middle, x0.1 and x10 around it.
LR_FACTORS = (0.1, 1, 10)
ADAM_LRS = (1e-4, 1e-3, 1e-2)
SGDN_LRS = (1e-3, 1e-2, 1e-1)
PRODIGY_LRS = (0.1, 1.0, 10.0)  # Prodigy's lr multiplies its own step-size estimate


@dataclass(frozen=True)
class OptSpec:
    name: str
    lrs: tuple[float, ...]  # the comparison's: x0.1, x1, x10 of the family default
    make: Callable  # (params, lr) -> optimizer
    hd: str = ""  # the hyper-gradient settings, for the settings table
    quick: bool = False
    schedule_free: bool = False  # needs opt.train() / opt.eval() around evaluation


def optimizer_specs(s: Setting) -> list[OptSpec]:
    """Every optimizer compared on model `s`, with the paper's hyper-gradient settings."""
    wd = s.weight_decay

    def hd_kwargs(beta, levels, weights):  # the paper's rule is the additive one (not the default)
        return dict(levels=levels, init_weights=weights, hypergrad_rule="additive", hypergrad_lr=beta,
                    combination_lr=s.delta, hd_decay=s.hd_decay, weight_decay=wd)

    def adam_hd(levels, weights=None):
        return lambda p, lr: mlhd.MultiLevelAdam(p, lr=lr, **hd_kwargs(s.adam_beta, levels, weights))

    def sgdn_hd(levels, weights=None):
        return lambda p, lr: mlhd.MultiLevelSGD(p, lr=lr, momentum=0.9, nesterov=True,
                                                **hd_kwargs(s.sgd_beta, levels, weights))

    def describe(beta, preset=None):
        text = f"beta {beta:g}" + (f", hd_decay {s.hd_decay:g}" if s.hd_decay else "")
        if preset:
            text += f", levels {'/'.join(preset.levels)} = {'/'.join(map(str, preset.init_weights))}, delta {s.delta:g}"
        return text

    specs = [
        OptSpec("Adam", ADAM_LRS, lambda p, lr: torch.optim.Adam(p, lr=lr, weight_decay=wd), quick=True),
        OptSpec("Adam-HD", ADAM_LRS, adam_hd(("global",)), describe(s.adam_beta)),
        *[OptSpec(f"Adam-CAM-HD ({c.tag})", ADAM_LRS, adam_hd(c.levels, c.init_weights),
                  describe(s.adam_beta, c), quick=c is s.presets[0]) for c in s.presets],
        OptSpec("SGDN", SGDN_LRS, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True,
                                                               weight_decay=wd), quick=True),
        OptSpec("SGDN-HD", SGDN_LRS, sgdn_hd(("global",)), describe(s.sgd_beta)),
        *[OptSpec(f"SGDN-CAM-HD ({c.tag})", SGDN_LRS, sgdn_hd(c.levels, c.init_weights),
                  describe(s.sgd_beta, c), quick=c is s.presets[0]) for c in s.presets],
    ]
    if prodigyopt is not None:
        specs.append(OptSpec("Prodigy", PRODIGY_LRS, lambda p, lr: _quiet(prodigyopt.Prodigy, p, lr=lr, weight_decay=wd)))
    if schedulefree is not None:
        specs.append(OptSpec("SF-AdamW", ADAM_LRS,
                             lambda p, lr: schedulefree.AdamWScheduleFree(p, lr=lr, weight_decay=wd),
                             schedule_free=True))
    return specs


# The multiplicative rule (docs/algorithm.md section 2, step 4) in the robustness study: Baydin et al.'s
# hypergrad_lr 0.02 and a faster 0.05, each with a slow, a medium and a fast combination_lr.
HDM_BETAS = (0.02, 0.05)
HDM_DELTAS = (0.02, 0.1, 0.5)
LIBRARY_DEFAULTS = "library defaults"  # the spec name's tag of the rows that pass no HD option


def robustness_specs(s: Setting, factors: tuple[float, ...]) -> list[OptSpec]:
    """The lr-robustness study's optimizers on model `s`, each at `factors` x its family's
    default lr: every optimizer of the comparison (paper settings); the multiplicative rule
    on the global level alone and combined over global+unit and over the paper's levels (where
    they differ), at HDM_BETAS x HDM_DELTAS for Adam and HDM_BETAS x the middle delta for SGDN
    (to keep the study's time); and both multilevel_hd optimizers with every hyper-gradient
    option left at the library's defaults of the running version."""
    wd = s.weight_decay
    families = [
        dict(cls=mlhd.MultiLevelAdam, name="Adam", kind="adam", base={}, lr=ADAM_LRS[1], deltas=HDM_DELTAS),
        dict(cls=mlhd.MultiLevelSGD, name="SGDN", kind="sgd", base=dict(momentum=0.9, nesterov=True),
             lr=SGDN_LRS[1], deltas=HDM_DELTAS[1:2]),
    ]
    grid = lambda default_lr: tuple(default_lr * f for f in factors)
    presets = [CamPreset("g+u", ("global", "unit"), (0.8, 0.2)), *[c for c in s.presets[:1] if c.tag != "g+u"]]

    def hdm(f, beta, preset=None, delta=None):
        levels, weights = (preset.levels, preset.init_weights) if preset else (("global",), None)
        make = lambda p, lr: f["cls"](p, lr=lr, weight_decay=wd, **f["base"], levels=levels,
                                      init_weights=weights, hypergrad_rule="multiplicative",
                                      hypergrad_lr=beta, combination_lr=delta)
        if preset is None:
            return OptSpec(f"{f['name']}-HDM b={beta:g}", grid(f["lr"]), make, f"multiplicative, beta {beta:g}")
        return OptSpec(f"{f['name']}-CAM-HDM ({preset.tag}) b={beta:g} d={delta:g}", grid(f["lr"]), make,
                       f"multiplicative, beta {beta:g}, levels {'/'.join(levels)} = "
                       f"{'/'.join(map(str, weights))}, delta {delta:g}")

    def library_defaults(f):
        make = lambda p, lr: f["cls"](p, lr=lr, weight_decay=wd, **f["base"])
        return OptSpec(f"{f['name']} ({LIBRARY_DEFAULTS})", grid(f["lr"]), make,
                       describe_defaults(f["cls"], f["kind"], f["lr"]))

    paper = f"({s.presets[0].tag})"  # one name for the paper's levels on every model
    specs = [replace(spec, name=spec.name.replace(paper, "(paper)"), lrs=grid(spec.lrs[1]))
             for spec in optimizer_specs(s)]
    for f in families:
        specs += [hdm(f, beta) for beta in HDM_BETAS]
        specs += [hdm(f, beta, c, delta) for c in presets for beta in HDM_BETAS for delta in f["deltas"]]
        specs.append(library_defaults(f))
    return specs


def describe_defaults(cls, kind: str, lr: float) -> str:
    """The hyper-gradient options that `cls` resolves when given none, in this process (the
    study's "library defaults" rows follow the installed version)."""
    group = cls([torch.zeros(1, requires_grad=True)], lr=lr).param_groups[0]
    o = resolve(group, kind)
    betas = sorted(set(o.hypergrad_lr.values()))
    return (f"{o.rule}, beta {'/'.join(f'{b:g}' for b in betas)}, levels {'/'.join(o.levels)} = "
            f"{'/'.join(f'{w:g}' for w in o.init_weights)}, delta {o.combination_lr:g} at lr {lr:g}, "
            f"hd_decay {o.hd_decay:g}")


def _quiet(make, *args, **kwargs):
    """Construct without printing: Prodigy announces its weight decay mode on stdout, which
    would tear the progress bars apart once per run."""
    with contextlib.redirect_stdout(io.StringIO()):
        return make(*args, **kwargs)



def throughput_specs(backends: Optional[str] = None) -> list[OptSpec]:
    """The ResNet settings (global+unit CAM-HD, the paper's ResNet betas), at the default lr;
    with `backends` (comma list) instead torch.optim.Adam(fused=True) and MultiLevelAdam
    (global+unit, lr 1e-3) on each of those multilevel_hd backends."""
    if not backends:
        return optimizer_specs(SETTINGS["resnet18"])
    lrs = (1e-3,) * 3
    specs = [OptSpec("Adam (fused)", lrs, lambda p, lr: torch.optim.Adam(p, lr=lr, fused=True))]
    for b in backends.split(","):
        specs.append(OptSpec(f"MultiLevelAdam [global+unit] ({b})", lrs,
                             lambda p, lr, b=b: mlhd.MultiLevelAdam(p, lr=lr, backend=b)))
    return specs

