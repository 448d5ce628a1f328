"""How fast the learned rates and weights move, under LR schedules and over the lr range:
the measurement behind the defaults of `multilevel_hd.options` (README, "The defaults").

The problem is issue 20's: a 32-64-1 MLP (tanh) regressing a fixed random teacher, batch 64
(a fresh batch per step), float32, 60 steps. A run records the largest relative change of
any rate (every active level's every element) and of any weight, from its start over the run
("move") and in one step ("step"), and at the end the global rate over its start, the
weights and the last loss. A schedule is compared with a
constant run at its peak lr, on the same data and seeds.

    python tests/schedule_study.py            # the README table (about 2 min on one core)

tests/test_safe_defaults.py calls `run` on a smaller problem.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

import multilevel_hd as mlhd

STEPS = 60


def constant(opt, steps):
    return None


def one_cycle(opt, steps):
    # max_lr is the lr the user chose; OneCycleLR starts at max_lr / 25 (its initial_lr)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps,
                                               cycle_momentum=False)


def cyclic(opt, steps):
    lr = opt.param_groups[0]["lr"]  # CyclicLR starts at base_lr, which becomes initial_lr
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=lr / 10, max_lr=lr, step_size_up=max(1, steps // 6),
                                             cycle_momentum=False)


def warmup_cosine(opt, steps):
    warm = max(1, steps // 6)
    return torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warm),
    ], milestones=[warm])


SCHEDULES = {"constant": constant, "one_cycle": one_cycle, "cyclic": cyclic, "warmup_cosine": warmup_cosine}


@dataclass
class Run:
    rate_step: float  # the largest relative change of any rate in one step
    weight_step: float  # the largest relative change of any weight in one step
    rate_move: float  # the largest relative change of any rate from its start, over the run
    weight_move: float  # the largest relative change of any weight from its start, over the run
    rate_drift: float  # the global rate at the end over its start
    weights: list  # at the end
    loss: float  # the last step's
    finite: bool  # parameters, rates and weights


def _flat_rates(entry: dict) -> torch.Tensor:
    parts = []
    for level, value in entry.items():
        if level == "weights":
            continue
        parts += [v.reshape(-1) for v in value] if isinstance(value, list) else [value.reshape(-1)]
    return torch.cat([x.double() for x in parts])


def _relative_step(new: torch.Tensor, old: torch.Tensor) -> float:
    moved = (new - old).abs()
    rel = torch.where(old != 0, moved / old.abs(), torch.where(moved > 0, math.inf, 0.0))
    return float(rel.max())


def run(optimizer: str, lr: float, schedule: str = "constant", seed: int = 0, steps: int = STEPS,
        sizes=(32, 64, 1), batch: int = 64, dtype=torch.float32, backend: str = "torch", **options) -> Run:
    """One training run of `optimizer` ("adamw" or "sgd": SGD with Nesterov momentum 0.9)."""
    gen = torch.Generator().manual_seed(seed)
    n_in, hidden, n_out = sizes
    teacher = [torch.randn(hidden, n_in, generator=gen) / math.sqrt(n_in), torch.randn(n_out, hidden, generator=gen)]
    params = [(torch.randn(hidden, n_in, generator=gen) / math.sqrt(n_in)).to(dtype), torch.zeros(hidden, dtype=dtype),
              (torch.randn(n_out, hidden, generator=gen) / math.sqrt(hidden)).to(dtype), torch.zeros(n_out, dtype=dtype)]
    for p in params:
        p.requires_grad_(True)
    if optimizer == "adamw":
        opt = mlhd.MultiLevelAdamW(params, lr=lr, backend=backend, **options)
    else:
        opt = mlhd.MultiLevelSGD(params, lr=lr, momentum=0.9, nesterov=True, backend=backend, **options)
    sched = SCHEDULES[schedule](opt, steps)
    before = first = opt.rates()[0]
    start_rate = float(before["global"]) if "global" in before else float(_flat_rates(before)[0])
    rate_step = weight_step = rate_move = weight_move = 0.0
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        x = torch.randn(batch, n_in, generator=gen)
        y = torch.tanh(x @ teacher[0].T) @ teacher[1].T
        opt.zero_grad()
        pred = torch.tanh(x.to(dtype) @ params[0].T + params[1]) @ params[2].T + params[3]
        loss = torch.nn.functional.mse_loss(pred.float(), y)
        loss.backward()
        loss = loss.detach()
        opt.step()
        if sched is not None:
            sched.step()
        after = opt.rates()[0]
        rate_step = max(rate_step, _relative_step(_flat_rates(after), _flat_rates(before)))
        weight_step = max(weight_step, _relative_step(after["weights"].double(), before["weights"].double()))
        rate_move = max(rate_move, _relative_step(_flat_rates(after), _flat_rates(first)))
        weight_move = max(weight_move, _relative_step(after["weights"].double(), first["weights"].double()))
        before = after
    end_rate = float(before["global"]) if "global" in before else float(_flat_rates(before)[0])
    finite = all(bool(torch.isfinite(p).all()) for p in params) and bool(torch.isfinite(_flat_rates(before)).all()) \
        and bool(torch.isfinite(before["weights"]).all())
    return Run(rate_step, weight_step, rate_move, weight_move, end_rate / start_rate if start_rate > 0 else math.nan,
               [round(float(w), 3) for w in before["weights"]], loss.item(), finite)


PAPER = dict(hypergrad_rule="additive")  # the paper's rule, beta and derived delta (the old defaults)


def main(seeds=(0, 1, 2), lrs=(1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
    settings = {"paper additive": PAPER, "defaults": {}}
    settings.update({f"mult. delta={d}": dict(hypergrad_rule="multiplicative", combination_lr=d)
                     for d in map(float, sys.argv[1:])})
    print("| optimizer | setting | lr | rate move: constant / worst schedule (which) | weight move: constant / worst "
          "schedule (which) | rate step: constant / worst schedule | weight step: constant / worst schedule | "
          "global rate x (constant) | weights at the end (constant) | loss: constant / one_cycle | finite |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for optimizer in ("adamw", "sgd"):
        for name, options in settings.items():
            for lr in lrs:
                runs = {s: [run(optimizer, lr, s, seed, **options) for seed in seeds] for s in SCHEDULES}
                worst = lambda key, s: max(getattr(r, key) for r in runs[s])  # noqa: E731
                scheduled = [s for s in SCHEDULES if s != "constant"]
                sched_r, sched_w, step_r, step_w = (max(scheduled, key=lambda s: worst(key, s)) for key in
                                                    ("rate_move", "weight_move", "rate_step", "weight_step"))
                const = runs["constant"]
                drift = sum(r.rate_drift for r in const) / len(const)
                w_end = [round(sum(r.weights[k] for r in const) / len(const), 3) for k in range(len(const[0].weights))]
                loss_c = sum(r.loss for r in const) / len(const)
                loss_o = sum(r.loss for r in runs["one_cycle"]) / len(const)
                finite = all(r.finite for rs in runs.values() for r in rs)
                print(f"| {optimizer} | {name} | {lr:g} | {worst('rate_move', 'constant'):.3g} / "
                      f"{worst('rate_move', sched_r):.3g} ({sched_r}) | {worst('weight_move', 'constant'):.3g} / "
                      f"{worst('weight_move', sched_w):.3g} ({sched_w}) | {worst('rate_step', 'constant'):.3g} / "
                      f"{worst('rate_step', step_r):.3g} | {worst('weight_step', 'constant'):.3g} / "
                      f"{worst('weight_step', step_w):.3g} | {drift:.3g} | {w_end} | "
                      f"{loss_c:.3g} / {loss_o:.3g} | {finite} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
