"""The lr-robustness study (`python -m bench.train --robustness`): every optimizer from x0.03
to x30 of its family's default lr on the three models, in shorter runs than the comparison's.
Per optimizer: the worst case and the mean over that grid, the runs that failed, how far the
learned global rate moved and where the combination weights ended."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .loop import Job, Run
from .optimizers import SETTINGS, Setting, robustness_specs
from .tables import Row, summarize

FACTORS = (0.03, 0.1, 1, 10, 30)  # initial lr / family default: three decades around it
QUICK_FACTORS = (0.03, 30)
SEEDS, QUICK_SEEDS = 3, 1
# Shorter runs than the comparison's (the study took 34 min with --workers 2 on a 2-core machine
# at load 9); ResNet-18 on the native 8x8 digits (four times cheaper than 16x16).
STUDY_RUNS = {
    "ffn": dict(epochs=10, quick_epochs=1),  # 210 steps
    "lenet5": dict(epochs=4, quick_epochs=1),  # 84 steps
    "resnet18": dict(epochs=3, quick_epochs=1, image_size=8),  # 63 steps
}
COLLAPSED = 0.01  # a combination weight below this (so another near 1) has collapsed


def study_setting(model: str) -> Setting:
    s = SETTINGS[model]
    return replace(s, **STUDY_RUNS[model], note=f"{s.note} (the comparison's; this study's epochs and input "
                                                 f"size are in the table)")


def plan(models: list[str], quick: bool, seeds: Optional[int] = None) -> list[Job]:
    """The study's runs, in table order (model, optimizer, lr, seed)."""
    factors = QUICK_FACTORS if quick else FACTORS
    seeds = seeds or (QUICK_SEEDS if quick else SEEDS)
    jobs = []
    for name in models:
        s = study_setting(name)
        epochs = s.quick_epochs if quick else s.epochs
        jobs += [Job(s, spec, lr, seed, epochs)
                 for spec in robustness_specs(s, factors) for lr in spec.lrs for seed in range(seeds)]
    return jobs


@dataclass
class Robustness:
    """One optimizer on one model over the lr grid (rows in lr order, one Row per lr)."""

    model: str
    optimizer: str
    factors: tuple[float, ...]  # initial lr / family default of each row
    rows: list[Row]

    @property
    def runs(self) -> list[Run]:
        return [r for row in self.rows for r in row.runs]

    def worst(self) -> tuple[float, Row]:
        """The lr (as its factor) whose mean accuracy over seeds is lowest, and its row."""
        return min(zip(self.factors, self.rows), key=lambda fr: fr[1].stat("test_acc")[0])

    def mean_acc(self) -> float:
        return float(np.mean([r.test_acc for r in self.runs]))

    def seed_spread(self) -> float:
        """Mean over the lrs of the seeds' standard deviation of accuracy (NaN: one seed)."""
        return float(np.mean([row.stat("test_acc")[1] for row in self.rows]))

    def outcomes(self) -> dict[str, int]:
        counts = {"diverged": 0, "stalled": 0}
        for r in self.runs:
            if r.outcome() != "ok":
                counts[r.outcome()] += 1
        return counts

    def rate_ratios(self) -> list[float]:
        """Per lr, the median over seeds of the final / initial global rate."""
        return [float(np.median([r.rate_ratio() for r in row.runs])) for row in self.rows]

    def weights(self) -> tuple[list[float], int]:
        """Mean final combination weights over every run, and the runs where one collapsed."""
        finals = [w for w in (r.final_weights() for r in self.runs) if w]
        if not finals:
            return [], 0
        collapsed = sum(min(w) < COLLAPSED for w in finals)
        return np.mean(finals, axis=0).tolist(), collapsed


def robustness(runs: list[Run], factors: tuple[float, ...]) -> list[Robustness]:
    """Per (model, optimizer), in plan order; `factors` as planned."""
    out: dict[tuple[str, str], Robustness] = {}
    for row in summarize(runs):
        key = (row.model, row.optimizer)
        out.setdefault(key, Robustness(row.model, row.optimizer, factors, [])).rows.append(row)
    return list(out.values())
