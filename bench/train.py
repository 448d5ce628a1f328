"""Does multi-level hyper-gradient descent train better?  The project's main job.

Trains three models on scikit-learn's bundled handwritten digits (1,797 8x8 images, no
download; one fixed stratified 75/25 split) with Adam, SGD with Nesterov momentum, their HD
and CAM-HD variants and, when installed, Prodigy and schedule-free AdamW, over three initial
learning rates and several seeds. Writes a table (Markdown, CSV) and figures to --out.

    python -m bench.train                       the full comparison (about 20 min on one CPU thread)
    python -m bench.train --quick               smoke run, under 3 min: every model, fewer runs
    python -m bench.train --device cuda         the same on a GPU
    python -m bench.train --throughput --device cuda
                                                images/s of a ResNet-50 training step per optimizer
    python -m bench.train --throughput --batch-size 2 --image-size 64 --out /tmp/tp
                                                a CPU smoke run of the same
    python -m bench.train --throughput --device cuda --backends triton,cuda
                                                fused Adam against MultiLevelAdam on each backend

Needs the `examples` extra: pip install -e ".[examples]".
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import multilevel_hd as mlhd
from multilevel_hd import backends as mlhd_backends

try:
    import prodigyopt
except ImportError:
    prodigyopt = None
try:
    import schedulefree
except ImportError:
    schedulefree = None

DEFAULT_OUT = Path(__file__).parent / "results"
TEST_FRACTION = 0.25
SPLIT_SEED = 0  # the split never changes; seeds vary the initialisation and batch order
LOG_EVERY = 5  # steps between loss / rates() records: cheap enough to keep for every run
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)  # summary of the spread of unit and param rates
FULL_SEEDS, QUICK_SEEDS = 3, 2


# --------------------------------------------------------------------------- data
@dataclass
class Digits:
    x_train: torch.Tensor  # [n, 1, 8, 8], standardised with the training set's statistics
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def resized(self, size: int) -> "Digits":
        """Bilinear upsampling for models that need larger inputs (done once, not per batch)."""
        if size == self.x_train.shape[-1]:
            return self
        up = lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return Digits(up(self.x_train), self.y_train, up(self.x_test), self.y_test)


def load_digits_split(device: torch.device) -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    mean, std = x_tr.mean(), x_tr.std()
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32, device=device).view(-1, 1, 8, 8)
    as_y = lambda a: torch.tensor(a, dtype=torch.long, device=device)
    return Digits(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


# --------------------------------------------------------------------------- models
def feed_forward() -> nn.Module:
    """The paper's MNIST MLP shape on 8x8 digits: 64-100-100-10."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def lenet5() -> nn.Module:
    """LeNet-5 on 32x32 inputs: conv5(6)-pool-conv5(16)-pool-120-84-10 (ReLU, max-pooling)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the BatchNorm after it has one.
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, planes, 3, stride), nn.ReLU(inplace=True), *_conv_bn(planes, planes, 3))
        self.shortcut = _shortcut(c_in, planes, stride)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision), 1x1 expand x4 (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(c_in, planes, 1), nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            *_conv_bn(planes, planes * 4, 1),
        )
        self.shortcut = _shortcut(c_in, planes * 4, stride)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))


class ResNet(nn.Module):
    """A stem, four stages of residual blocks (widths w, 2w, 4w, 8w; stride 2 from the
    second stage on), global average pooling and a linear classifier."""

    def __init__(self, stem: nn.Module, block, blocks_per_stage, width: int, num_classes: int):
        super().__init__()
        self.stem = stem
        blocks, c_in = [], width
        for stage, n_blocks in enumerate(blocks_per_stage):
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(c_in, width * 2**stage, stride))
                c_in = width * 2**stage * block.expansion
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def cifar_resnet18(width: int = 16, in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """The paper's CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool); width 64 is the
    original, the digits runs use 16 so that they train on two CPU cores."""
    stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
    return ResNet(stem, BasicBlock, (2, 2, 2, 2), width, num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """torchvision's ResNet-50 layout and parameter shapes, built without torchvision."""
    stem = nn.Sequential(*_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    return ResNet(stem, Bottleneck, (3, 4, 6, 3), 64, num_classes)


# --------------------------------------------------------------------------- settings
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
    lrs: tuple[float, float, float]
    make: Callable  # (params, lr) -> optimizer
    hd: str = ""  # the hyper-gradient settings, for the settings table
    quick: bool = False
    schedule_free: bool = False  # needs opt.train() / opt.eval() around evaluation


def optimizer_specs(s: Setting) -> list[OptSpec]:
    """Every optimizer compared on model `s`, with the paper's hyper-gradient settings."""
    wd = s.weight_decay

    def hd_kwargs(beta, levels, weights):
        return dict(levels=levels, init_weights=weights, hypergrad_lr=beta, combination_lr=s.delta,
                    hd_decay=s.hd_decay, weight_decay=wd)

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


def _quiet(make, *args, **kwargs):
    """Construct without printing: Prodigy announces its weight decay mode on stdout, which
    would tear the progress bars apart once per run."""
    with contextlib.redirect_stdout(io.StringIO()):
        return make(*args, **kwargs)


@dataclass(frozen=True)
class Job:
    setting: Setting
    spec: OptSpec
    lr: float
    seed: int
    epochs: int


def plan(models: list[str], quick: bool, seeds: Optional[int] = None) -> list[Job]:
    """The runs of one comparison, in table order (model, optimizer, lr, seed)."""
    n_seeds = seeds or (QUICK_SEEDS if quick else FULL_SEEDS)
    jobs = []
    for name in models:
        s = SETTINGS[name]
        for spec in optimizer_specs(s):
            if quick and not spec.quick:
                continue
            lrs = spec.lrs[1:2] if quick else spec.lrs
            jobs += [Job(s, spec, lr, seed, s.quick_epochs if quick else s.epochs)
                     for lr in lrs for seed in range(n_seeds)]
    return jobs


# --------------------------------------------------------------------------- one run
@dataclass
class Run:
    model: str
    optimizer: str
    lr: float
    seed: int
    test_acc: float = math.nan
    train_loss: float = math.nan  # on the whole training set, evaluation mode, after training
    seconds: float = math.nan
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean minibatch loss since the last record
    levels: list[str] = field(default_factory=list)  # of a multilevel_hd optimizer, in weights order
    rates: list[dict] = field(default_factory=list)  # rate_snapshot() at the same steps (log_rates)


def rate_snapshot(opt, summary: dict) -> dict:
    """What the rate figures need (one param group): the weights and the global rate from
    the `mlhd.rate_summary` that `mlhd.log_rates` passes, every layer rate and quantiles of
    the unit and param rates from opt.rates()."""
    levels = opt.param_groups[0]["levels"]
    snap = {"weights": [summary[f"group0/weight/{level}"] for level in levels]}
    if "global" in levels:
        snap["global"] = summary["group0/rate/global"]
    group = opt.rates()[0]
    if "layer" in group:
        snap["layer"] = torch.stack(group["layer"]).tolist()
    for level in ("unit", "param"):
        if level in group:
            flat = torch.cat([r.reshape(-1) for r in group[level]]).float()
            snap[level] = torch.quantile(flat, torch.tensor(QUANTILES, device=flat.device)).tolist()
    return snap


def batches(data: Digits, batch_size: int, gen: torch.Generator):
    """Shuffled minibatches; the last partial batch is dropped (a 3-image batch would give
    BatchNorm useless statistics)."""
    order = torch.randperm(len(data.y_train), generator=gen).to(data.y_train.device)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield data.x_train[idx], data.y_train[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in evaluation mode."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), chunk):
        logits = model(x[start:start + chunk])
        loss += F.cross_entropy(logits, y[start:start + chunk], reduction="sum").item()
        correct += (logits.argmax(1) == y[start:start + chunk]).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


@torch.no_grad()
def precise_batchnorm(model: nn.Module, data: Digits, batch_size: int) -> None:
    """Recompute BatchNorm statistics at the final weights, for every optimizer alike.

    Running statistics are an average over the last ~10 steps (momentum 0.1) of weights that
    were still moving fast in these short runs, so evaluation would measure that lag rather
    than the weights the optimizer found; schedule-free optimizers also evaluate at an
    averaged point that training never visited. One pass over the training set with a
    cumulative average fixes both; the model is not trained afterwards."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    for xb, _ in batches(data, batch_size, torch.Generator().manual_seed(0)):
        model(xb)


def train_run(job: Job, data: Digits, device: torch.device) -> Run:
    s, spec = job.setting, job.spec
    torch.manual_seed(job.seed)
    model = s.build().to(device)
    opt = spec.make(model.parameters(), job.lr)
    is_hd = isinstance(opt, (mlhd.MultiLevelAdam, mlhd.MultiLevelSGD))
    gen = torch.Generator().manual_seed(job.seed)
    run = Run(s.name, spec.name, job.lr, job.seed, levels=list(opt.param_groups[0]["levels"]) if is_hd else [])
    if is_hd:  # a step hook records the rates at the same steps as the losses below
        mlhd.log_rates(opt, LOG_EVERY, lambda _, summary: run.rates.append(rate_snapshot(opt, summary)))
    started = time.perf_counter()
    if spec.schedule_free:
        opt.train()
    step, loss_sum = 0, torch.zeros((), device=device)
    for _ in tqdm(range(job.epochs), desc="epochs", leave=False):
        for xb, yb in batches(data, s.batch_size, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach()
            if step % LOG_EVERY == 0:  # the only host synchronisations of the loop
                run.steps.append(step)
                run.losses.append(loss_sum.item() / LOG_EVERY)
                loss_sum.zero_()
    if spec.schedule_free:
        opt.eval()  # swaps in the averaged weights
    precise_batchnorm(model, data, s.batch_size)
    run.train_loss, _ = evaluate(model, data.x_train, data.y_train)
    _, run.test_acc = evaluate(model, data.x_test, data.y_test)
    run.seconds = time.perf_counter() - started
    return run


# --------------------------------------------------------------------------- tables
@dataclass
class Row:
    model: str
    optimizer: str
    lr: float
    runs: list[Run]

    def values(self, key: str) -> np.ndarray:
        return np.array([getattr(r, key) for r in self.runs], dtype=float)

    def stat(self, key: str) -> tuple[float, float]:
        """Mean and sample standard deviation over the seeds (NaN if any seed diverged)."""
        values = self.values(key)
        return values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan

    def cell(self, key: str, scale: float = 1.0, digits: int = 2) -> str:
        """"mean ± std" for the table, or how many seeds ended non-finite."""
        values = self.values(key)
        diverged = int((~np.isfinite(values)).sum())
        if diverged:
            return f"diverged ({diverged} of {len(values)} seeds)"
        mean, std = self.stat(key)
        return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if math.isfinite(std) else "")


def summarize(runs: list[Run]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for r in runs:  # dicts keep insertion order, so rows keep the plan's order
        rows.setdefault((r.model, r.optimizer, r.lr), Row(r.model, r.optimizer, r.lr, [])).runs.append(r)
    return list(rows.values())


def markdown_table(rows: list[Row]) -> str:
    best = {}
    for row in rows:
        best[row.model] = max(best.get(row.model, 0.0), row.stat("test_acc")[0])
    lines = ["| model | optimizer | lr | test accuracy % | final training loss | s / run |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        acc = row.cell("test_acc", scale=100)
        if row.stat("test_acc")[0] == best[row.model]:
            acc = f"**{acc}**"
        lines.append(f"| {row.model} | {row.optimizer} | {row.lr:g} | {acc} | "
                     f"{row.cell('train_loss', digits=4)} | {row.stat('seconds')[0]:.1f} |")
    return "\n".join(lines)


def by_optimizer(rows: list[Row], model: str) -> dict[str, list[Row]]:
    """A model's rows grouped by optimizer (each list in lr order, as planned)."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        if r.model == model:
            out.setdefault(r.optimizer, []).append(r)
    return out


def lr_factors(n_lrs: int) -> tuple:
    """The sweep's lr / family default of each column (a --quick run has only the default)."""
    return LR_FACTORS if n_lrs == len(LR_FACTORS) else (1,) * n_lrs


def sweep_tables(rows: list[Row]) -> str:
    """Per model: test accuracy by optimizer (rows) and initial lr (columns: x0.1, x1, x10)."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        by_opt = by_optimizer(rows, model)
        n_lrs = max(len(v) for v in by_opt.values())
        out += [f"**{model}**, test accuracy %", "",
                "| optimizer | " + " | ".join(f"lr x{f:g}" for f in lr_factors(n_lrs)) + " |",
                "|---" * (n_lrs + 1) + "|"]
        for name, opt_rows in by_opt.items():
            cells = [f"{r.cell('test_acc', scale=100, digits=1)} ({r.lr:g})" for r in opt_rows]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def settings_table(jobs: list[Job]) -> str:
    lrs: dict[tuple[str, str], list[float]] = {}
    first: dict[tuple[str, str], Job] = {}
    for j in jobs:
        key = (j.setting.name, j.spec.name)
        first.setdefault(key, j)
        if j.lr not in lrs.setdefault(key, []):
            lrs[key].append(j.lr)
    lines = ["| model | input | epochs | batch | weight decay | optimizer | lrs | hyper-gradient settings |",
             "|---|---|---|---|---|---|---|---|"]
    for key, j in first.items():
        s = j.setting
        lines.append(f"| {s.name} | {s.image_size}x{s.image_size} | {j.epochs} | {s.batch_size} | {s.weight_decay:g} "
                     f"| {j.spec.name} | {', '.join(f'{lr:g}' for lr in lrs[key])} | {j.spec.hd or '-'} |")
    notes = [f"- {s.name}: {s.note}" for s in dict.fromkeys(j.setting for j in jobs)]
    return "\n".join(lines + [""] + notes)


def write_csv(rows: list[Row], runs: list[Run], out: Path) -> None:
    with open(out / "digits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "optimizer", "lr", "seeds", "test_acc_mean", "test_acc_std",
                    "train_loss_mean", "train_loss_std", "seconds_mean"])
        for row in rows:
            w.writerow([row.model, row.optimizer, row.lr, len(row.runs), *row.stat("test_acc"),
                        *row.stat("train_loss"), row.stat("seconds")[0]])
    with open(out / "digits_runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "optimizer", "lr", "seed", "test_acc", "train_loss", "seconds",
                    "last_global_rate", "last_weights"])
        for r in runs:
            last = r.rates[-1] if r.rates else {}  # the last rates() record of an HD run
            w.writerow([r.model, r.optimizer, r.lr, r.seed, r.test_acc, r.train_loss, r.seconds,
                        last.get("global", ""), "/".join(f"{x:.4f}" for x in last.get("weights", []))])


# --------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _style(rows: list[Row]) -> dict[str, dict]:
    """One colour per optimizer, the same in every figure; dashed SGDN family, dotted others."""
    names = list(dict.fromkeys(r.optimizer for r in rows))
    plt = _pyplot()
    colours = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]  # 18: enough for every name
    return {n: dict(color=colours[i % len(colours)],
                    ls="-" if n.startswith("Adam") else "--" if n.startswith("SGDN") else ":")
            for i, n in enumerate(names)}


def _nanmean(curves: list[list[float]]) -> np.ndarray:
    """Mean over seeds that ignores diverged (NaN) seeds, so one bad seed does not erase a curve."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every seed NaN at a step: NaN is right
        return np.nanmean(np.array(curves, dtype=float), axis=0)


def plot_losses(rows: list[Row], model: str, path: Path) -> None:
    plt = _pyplot()
    style = _style(rows)
    by_opt = by_optimizer(rows, model)
    n_lrs = max(len(v) for v in by_opt.values())
    fig, axes = plt.subplots(1, n_lrs, figsize=(5 * n_lrs, 4), squeeze=False, sharey=True)
    for name, opt_rows in by_opt.items():
        for ax, row in zip(axes[0], opt_rows):
            ax.plot(row.runs[0].steps, _nanmean([r.losses for r in row.runs]), label=name, **style[name])
    for ax, factor in zip(axes[0], lr_factors(n_lrs)):
        ax.set_title(f"{model}: initial lr x{factor:g} of the default")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0, 0].set_ylabel("training loss (mean over seeds)")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rates(rows: list[Row], model: str, path: Path) -> None:
    """Per HD optimizer (seed 0, default lr): global and layer rates, the spread of unit or
    param rates, the weights w, and the global rate from each initial lr."""
    plt = _pyplot()
    hd = {name: sweep for name, sweep in by_optimizer(rows, model).items() if sweep[0].runs[0].rates}
    if not hd:
        return
    fig, axes = plt.subplots(len(hd), 4, figsize=(18, 3.2 * len(hd)), squeeze=False)
    for axs, (name, sweep) in zip(axes, hd.items()):
        run = sweep[len(sweep) // 2].runs[0]
        _plot_coarse_rates(axs[0], run)
        _plot_fine_rates(axs[1], run)
        _plot_weights(axs[2], run)
        for row in sweep:
            axs[3].plot(row.runs[0].steps, [s["global"] for s in row.runs[0].rates], label=f"lr {row.lr:g}")
            axs[3].axhline(row.lr, color="grey", lw=0.5, ls=":")
        axs[0].set_ylabel(name)
        axs[3].set(title="global rate from each initial lr", yscale="log")
        axs[3].legend(fontsize=7)
        for ax in axs:
            ax.set_xlabel("step")
    fig.suptitle(f"{model}: learned rates (seed 0; columns 1-3 at the default lr)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_coarse_rates(ax, run: Run) -> None:
    snaps = run.rates
    if "layer" in snaps[0]:
        layers = np.array([s["layer"] for s in snaps])
        cmap = _pyplot().get_cmap("viridis")
        for j in range(layers.shape[1]):
            ax.plot(run.steps, layers[:, j], color=cmap(j / max(1, layers.shape[1] - 1)), lw=0.8)
    ax.plot(run.steps, [s["global"] for s in snaps], color="black", lw=2, label="global")
    ax.set_title("global (black) and layer rates (by depth)" if "layer" in snaps[0] else "global rate")


def _plot_fine_rates(ax, run: Run) -> None:
    level = next((lv for lv in ("unit", "param") if lv in run.rates[0]), None)
    if level is None:
        _empty(ax, "no unit or param level")
        return
    q = np.array([s[level] for s in run.rates])  # columns follow QUANTILES
    ax.fill_between(run.steps, q[:, 1], q[:, 3], alpha=0.3, label="10-90%")
    ax.plot(run.steps, q[:, 2], label="median")
    ax.plot(run.steps, q[:, 0], "k:", lw=0.8, label="min / max")
    ax.plot(run.steps, q[:, 4], "k:", lw=0.8)
    ax.set_title(f"spread of the {level} rates")
    ax.legend(fontsize=7)


def _plot_weights(ax, run: Run) -> None:
    if len(run.levels) < 2:
        _empty(ax, "one level: no combination weights")
        return
    w = np.array([s["weights"] for s in run.rates])
    for k, level in enumerate(run.levels):
        ax.plot(run.steps, w[:, k], label=level)
    ax.set_title("combination weights w")
    ax.legend(fontsize=7)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_accuracy(rows: list[Row], path: Path) -> None:
    plt = _pyplot()
    models = list(dict.fromkeys(r.model for r in rows))
    style = _style(rows)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for name, opt_rows in by_optimizer(rows, model).items():
            stats = [r.stat("test_acc") for r in opt_rows]
            ax.errorbar(lr_factors(len(opt_rows)), [100 * m for m, _ in stats], [100 * np.nan_to_num(s) for _, s in stats],
                        label=name, capsize=3, marker="o", ms=3, **style[name])
        ax.set(title=model, xscale="log", xlabel="initial lr / family default", ylabel="test accuracy %")
        low, high = ax.get_ylim()  # error bars of half-dead seeds would reach below 0 and above 100
        ax.set_ylim(max(low, 0), min(high, 100))
        ax.legend(fontsize=6)  # per panel: the CAM-HD presets differ between models
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the comparison
def warm_up_backend(device: torch.device) -> str:
    """Load the backend that backend="auto" picks before any run is timed (a C++ extension
    compiles on its first use), and return its name for the report."""
    p = torch.zeros(2, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    mlhd.MultiLevelSGD([p], lr=0.1).step()
    return mlhd_backends.resolve_backend("auto", device)


def compare(args, argv: list[str]) -> None:
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    jobs = plan(models, args.quick, args.seeds)
    settings_md = settings_table(jobs)
    print(settings_md, flush=True)
    backend = warm_up_backend(device)
    data = load_digits_split(device)
    resized = {size: data.resized(size) for size in {SETTINGS[m].image_size for m in models}}
    started = time.perf_counter()
    runs = []
    bar = tqdm(jobs, desc="runs")
    for job in bar:
        bar.set_postfix_str(f"{job.setting.name} {job.spec.name} lr={job.lr:g} seed={job.seed}")
        runs.append(train_run(job, resized[job.setting.image_size], device))
    minutes = (time.perf_counter() - started) / 60
    header = (f"`{shlex.join(['python', '-m', 'bench.train', *argv])}`: {len(runs)} runs in {minutes:.1f} min "
              f"on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
              f"multilevel_hd backend {backend!r}.")
    write_report(runs, settings_md, header, out)


def write_report(runs: list[Run], settings_md: str, header: str, out: Path) -> None:
    """digits_table.md, the CSVs and the figures; the tables also go to stdout."""
    rows = summarize(runs)
    tables = f"{markdown_table(rows)}\n\n## The learning-rate sweep\n\n{sweep_tables(rows)}"
    (out / "digits_table.md").write_text(
        f"{header}\n\n## Settings\n\n{settings_md}\n\n"
        f"## Results (mean ± std over seeds; bold: best per model)\n\n{tables}"
    )
    write_csv(rows, runs, out)
    for model in dict.fromkeys(r.model for r in runs):
        plot_losses(rows, model, out / f"digits_loss_{model}.png")
        plot_rates(rows, model, out / f"digits_rates_{model}.png")
    plot_accuracy(rows, out / "digits_accuracy.png")
    print(f"\n{tables}\n{header}\nwrote {out}/digits_*")


# --------------------------------------------------------------------------- throughput
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, spec: Optional[OptSpec], images, labels, steps: int, warmup: int) -> dict:
    """Median forward+backward and optimizer.step() times; spec None times no step at all."""
    device = images.device
    opt = spec.make(model.parameters(), spec.lrs[1]) if spec else None
    if spec and spec.schedule_free:
        opt.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd, step_times = [], []
    for i in tqdm(range(warmup + steps), desc=spec.name if spec else "no step", leave=False):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        _sync(device)
        middle = time.perf_counter()
        if opt:
            opt.step()
        _sync(device)
        if i >= warmup:
            fwd_bwd.append(middle - start)
            step_times.append(time.perf_counter() - middle)
    row = dict(optimizer=spec.name if spec else "(forward + backward only)",
               fwd_bwd=float(np.median(fwd_bwd)), step=float(np.median(step_times)))
    row["peak_gib"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if device.type == "cuda" else "-"
    return row


def throughput(args, argv: list[str]) -> None:
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch_size or (128 if on_gpu else 2)
    steps = args.steps or (20 if on_gpu else 3)
    warmup = 5 if on_gpu else 1
    backend = warm_up_backend(device)
    torch.manual_seed(0)
    model = resnet50().to(device)
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    specs = throughput_specs(args.backends)
    rows = [time_steps(model, spec, images, labels, steps, warmup) for spec in [None, *specs]]
    lines = [f"`{shlex.join(['python', '-m', 'bench.train', *argv])}`: ResNet-50 (torchvision layout, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters in {len(list(model.parameters()))} "
             f"tensors), batch {batch} of {args.image_size}x{args.image_size} synthetic images, float32, "
             f"{device}, multilevel_hd backend {args.backends or repr(backend)}, median of {steps} steps after "
             f"{warmup} warm-up.", "",
             "| optimizer | images / s | step ms | optimizer.step() ms | optimizer share % | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        total = r["fwd_bwd"] + r["step"]
        lines.append(f"| {r['optimizer']} | {batch / total:.1f} | {1e3 * total:.1f} | {1e3 * r['step']:.1f} "
                     f"| {100 * r['step'] / total:.1f} | {r['peak_gib']} |")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"throughput_{device.type}.md").write_text(report + "\n")


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: every model, fewer epochs, seeds, optimizers")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for tables and figures")
    ap.add_argument("--models", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--seeds", type=int, help=f"seeds per setting (default {FULL_SEEDS}, --quick {QUICK_SEEDS})")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: the digits models are too small to gain from more, "
                         "and on a shared machine 2 threads ran 2-10x slower)")
    ap.add_argument("--throughput", action="store_true", help="images/s of a ResNet-50 step per optimizer")
    ap.add_argument("--batch-size", type=int, help="--throughput batch (default 128 on cuda, 2 on cpu)")
    ap.add_argument("--image-size", type=int, default=224, help="--throughput image side (default 224)")
    ap.add_argument("--steps", type=int, help="--throughput timed steps (default 20 on cuda, 3 on cpu)")
    ap.add_argument("--backends", help="--throughput: fused Adam against MultiLevelAdam on these multilevel_hd "
                                       "backends (comma list, e.g. triton,cuda) instead of the ResNet settings")
    args = ap.parse_args(argv)
    unknown = set(args.models.split(",")) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    (throughput if args.throughput else compare)(args, argv)


if __name__ == "__main__":
    main()
