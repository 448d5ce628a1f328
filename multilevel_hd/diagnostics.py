"""Cheap summaries of the learned rates, for logging during training.

`opt.rates()` copies every rate (one tensor per parameter and level), too heavy to call
every few steps. `rate_summary(opt)` reduces the rates on their device and reads them back
in one transfer, so a summary costs one host synchronisation (one per device when param
groups live on different devices). `log_rates(opt, every, callback)` calls it from a step
hook every `every` steps. To send the summaries to TensorBoard (not a dependency):

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter()
    handle = mlhd.log_rates(opt, 100, lambda step, s: [writer.add_scalar(k, v, step) for k, v in s.items()])
    ...
    handle.remove()  # stop logging

Keys, for param group i and each of its active levels (weights in `levels` order):
    "group{i}/weight/{level}"            the combination weight the next step uses
    "group{i}/rate/global"               the global rate
    "group{i}/rate/{level}/mean|min|max" for layer, unit and param: over all rates of the
                                         level in the group, each rate counted once
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .options import resolve
from .state import GROUP_RATE_KEYS


def rate_summary(opt) -> dict[str, float]:
    """Weights and rates of every param group of a multilevel_hd optimizer, as floats;
    the same values `opt.rates()` holds (before a group's first step: the initial ones)."""
    chunks = []  # (names, float64 tensor of their values), in summary order
    for index, group in enumerate(opt.param_groups):
        opts = resolve(group, opt._kind)
        gs = opt._group_state_or_initial(index)
        prefix = f"group{index}"
        chunks.append(([f"{prefix}/weight/{level}" for level in opts.levels], gs["weights"].double()))
        for level in opts.levels:
            if level == "global":
                chunks.append(([f"{prefix}/rate/global"], gs["rate_global"].double().reshape(1)))
                continue
            if level == "param":
                rates = [opt._param_state_or_initial(p, opts)["param_rate"] for p in group["params"]]
            else:
                rates = [gs[GROUP_RATE_KEYS[level]]]
            names = [f"{prefix}/rate/{level}/{stat}" for stat in ("mean", "min", "max")]
            chunks.append((names, _mean_min_max(rates, gs["weights"].device)))
    read = {}  # per device: its values, read back in one transfer
    for device in dict.fromkeys(values.device for _, values in chunks):
        read[device] = iter(torch.cat([v for _, v in chunks if v.device == device]).tolist())
    return {name: next(read[values.device]) for names, values in chunks for name in names}


def _mean_min_max(rates: list, device) -> torch.Tensor:
    """[mean, min, max] (float64) over all elements of `rates`; NaN when they have none."""
    rates = [r for r in rates if r.numel()]
    if not rates:
        return torch.full((3,), math.nan, dtype=torch.float64, device=device)
    total = torch.stack([r.sum(dtype=torch.float64) for r in rates]).sum()
    low_high = torch.stack([torch.stack(torch.aminmax(r)).double() for r in rates])
    count = sum(r.numel() for r in rates)
    return torch.stack([total / count, low_high[:, 0].min(), low_high[:, 1].max()])


def log_rates(opt, every: int, callback: Callable[[int, dict], object]):
    """Call `callback(step_count, rate_summary(opt))` after every `every`-th `opt.step()`
    (counted from this call; a step that a group skips for a non-finite gradient counts).
    Returns the hook's handle: `handle.remove()` stops it."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    steps = 0

    def hook(optimizer, args, kwargs):
        nonlocal steps
        steps += 1
        if steps % every == 0:
            callback(steps, rate_summary(optimizer))

    return opt.register_step_post_hook(hook)
