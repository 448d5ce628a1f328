"""The tables: per-setting mean and spread over seeds (`Row`), Markdown and CSV, for the
comparison and for the lr-robustness study."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .loop import Job, Run
from .optimizers import LR_FACTORS

if TYPE_CHECKING:  # robustness.py builds on Row
    from .robustness import Robustness


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



def robustness_summary_table(stats: list[Robustness]) -> str:
    """One row per optimizer: its worst case over the lr grid on each model (mean over seeds
    at the worst lr), the worst of those, the mean over every run and the failed runs; best
    worst case first. Optimizers run on only some models come last."""
    models = list(dict.fromkeys(st.model for st in stats))
    by_name: dict[str, dict[str, Robustness]] = {}
    for st in stats:
        by_name.setdefault(st.optimizer, {})[st.model] = st

    def worst_of(per_model: dict) -> float:
        return min(st.worst()[1].stat("test_acc")[0] for st in per_model.values())

    order = sorted(by_name, key=lambda n: (len(by_name[n]) < len(models), -worst_of(by_name[n])))
    lines = ["| optimizer | " + " | ".join(f"{m}: worst % (lr x)" for m in models)
             + " | worst of all | mean of all % | diverged | stalled | runs |",
             "|---" * (len(models) + 6) + "|"]
    for name in order:
        per_model = by_name[name]
        cells = []
        for m in models:
            st = per_model.get(m)
            if st is None:
                cells.append("-")
                continue
            factor, row = st.worst()
            cells.append(f"{row.cell('test_acc', scale=100, digits=1)} (x{factor:g})")
        runs = [r for st in per_model.values() for r in st.runs]
        counts = [st.outcomes() for st in per_model.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * worst_of(per_model):.1f} | "
                     f"{100 * np.mean([r.test_acc for r in runs]):.1f} | {sum(c['diverged'] for c in counts)} | "
                     f"{sum(c['stalled'] for c in counts)} | {len(runs)} |")
    return "\n".join(lines)


def robustness_model_tables(stats: list[Robustness]) -> str:
    """Per model, per optimizer: the worst case and the mean over the grid, the seeds' spread,
    failed runs, the learned global rate's final / initial ratio at each lr, and the final
    combination weights (mean over runs) with the runs in which one collapsed."""
    out = []
    for model in dict.fromkeys(st.model for st in stats):
        rows = [st for st in stats if st.model == model]
        factors = rows[0].factors
        out += [f"**{model}**", "",
                "| optimizer | worst % (lr x) | mean % | seed std | diverged / stalled | global rate final / "
                "initial at " + ", ".join(f"x{f:g}" for f in factors) + " | final weights (collapsed runs) |",
                "|---|---|---|---|---|---|---|"]
        for st in rows:
            factor, worst = st.worst()
            counts = st.outcomes()
            ratios = st.rate_ratios()
            rates = " / ".join(f"{x:.2g}" for x in ratios) if np.isfinite(ratios).any() else "-"
            weights, collapsed = st.weights()
            w = f"{'/'.join(f'{x:.2f}' for x in weights)} ({collapsed})" if weights else "-"
            out.append(f"| {st.optimizer} | {worst.cell('test_acc', scale=100, digits=1)} (x{factor:g}) | "
                       f"{100 * st.mean_acc():.1f} | {_percent(st.seed_spread())} | "
                       f"{counts['diverged']} / {counts['stalled']} | {rates} | {w} |")
        out.append("")
    return "\n".join(out)


def _percent(x: float) -> str:
    return f"{100 * x:.1f}" if math.isfinite(x) else "-"  # one seed: no spread


def write_robustness_csv(stats: list[Robustness], path: Path) -> None:
    """Every run of the study: its outcome, the learned global rate's ratio, the final weights."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "optimizer", "lr_factor", "lr", "seed", "test_acc", "train_loss", "outcome",
                    "global_rate_ratio", "final_weights", "seconds"])
        for st in stats:
            for factor, row in zip(st.factors, st.rows):
                for r in row.runs:
                    w.writerow([r.model, r.optimizer, factor, r.lr, r.seed, r.test_acc, r.train_loss, r.outcome(),
                                r.rate_ratio(), "/".join(f"{x:.4f}" for x in r.final_weights()), r.seconds])
