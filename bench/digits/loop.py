"""The training loop: which runs a comparison makes (`plan`), one run (`train_run`) and what
it records (`Run`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import multilevel_hd as mlhd
from multilevel_hd import backends as mlhd_backends

from .data import Digits, batches
from .optimizers import SETTINGS, OptSpec, Setting, optimizer_specs

LOG_EVERY = 5  # steps between loss / rates() records: cheap enough to keep for every run
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)  # summary of the spread of unit and param rates
FULL_SEEDS, QUICK_SEEDS = 3, 2
AT_CHANCE = math.log(10) - 0.05  # final training loss of a net that guesses uniformly: ln 10


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

    def outcome(self) -> str:
        """"diverged": the loss went non-finite, or blew up past twice its start and ended at
        chance; "stalled": ended at chance without such a spike (a rate too small to start, or
        a net whose ReLUs died quietly at a large rate); else "ok"."""
        losses = np.array(self.losses + [self.train_loss], dtype=float)
        if not np.isfinite(losses).all():
            return "diverged"
        if self.train_loss >= AT_CHANCE:
            return "diverged" if losses.max() > 2 * losses[0] else "stalled"
        return "ok"

    def rate_ratio(self) -> float:
        """The learned global rate at the last record over the initial lr (NaN: none learned)."""
        last = self.rates[-1] if self.rates else {}
        return last["global"] / self.lr if "global" in last else math.nan

    def final_weights(self) -> list[float]:
        """The combination weights at the last record ([]: a single level or no HD)."""
        return self.rates[-1]["weights"] if self.rates and len(self.levels) > 1 else []


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



def warm_up_backend(device: torch.device) -> str:
    """Load the backend that backend="auto" picks before any run is timed (a C++ extension
    compiles on its first use), and return its name for the report."""
    p = torch.zeros(2, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    mlhd.MultiLevelSGD([p], lr=0.1).step()
    return mlhd_backends.resolve_backend("auto", device)

