"""The figures: accuracy against the initial lr, loss curves and the learned rates; the
lr-robustness study's accuracy over its lr grid."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .loop import Run
from .tables import Row, by_optimizer, lr_factors

if TYPE_CHECKING:  # robustness.py builds on Row
    from .robustness import Robustness


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



def plot_robustness(stats: list[Robustness], path: Path) -> None:
    """Test error (mean and std over seeds, log scale: a 1-point difference near 98 % shows as
    well as a failed run near 90 % error) against the initial lr / family default, one column
    per model: the comparison's optimizers and the library defaults on top, the multiplicative
    rule's settings below (with Adam and SGDN again, in grey, for reference). Solid: Adam
    family, dashed: SGDN family, dotted: others; markers: the levels."""
    plt = _pyplot()
    models = list(dict.fromkeys(st.model for st in stats))
    hdm = lambda name: "HDM" in name
    panel_names = [list(dict.fromkeys(st.optimizer for st in stats if not hdm(st.optimizer))),
                   list(dict.fromkeys(st.optimizer for st in stats if hdm(st.optimizer)))]
    colours = _pyplot().get_cmap("tab20").colors
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models) + 3.5, 9), squeeze=False, sharex=True)
    for col, model in enumerate(models):
        for st in (st for st in stats if st.model == model):
            error = 100 * (1 - np.array([row.stat("test_acc")[0] for row in st.rows]))
            std = 100 * np.nan_to_num([row.stat("test_acc")[1] for row in st.rows])
            panels = [1] if hdm(st.optimizer) else [0, 1] if st.optimizer in ("Adam", "SGDN") else [0]
            for panel in panels:
                style = dict(ls="-" if st.optimizer.startswith("Adam") else "--" if st.optimizer.startswith("SGDN") else ":",
                             marker="s" if "(g+u)" in st.optimizer else "^" if "(l+g)" in st.optimizer else "o")
                if st.optimizer in panel_names[panel]:
                    style["color"] = colours[panel_names[panel].index(st.optimizer) % len(colours)]
                else:  # a reference curve in the multiplicative panel
                    style.update(color="grey", lw=2.5, marker="")
                axes[panel, col].errorbar(st.factors, error, std, label=st.optimizer, capsize=2, ms=3, **style)
        for panel, title in enumerate(("paper settings, baselines, library defaults", "multiplicative rule (HDM)")):
            ax = axes[panel, col]
            ax.set(title=f"{model}: {title}", xscale="log", yscale="log", ylabel="test error % (log)")
            ax.set_ylim(top=100)
            ax.grid(True, which="both", alpha=0.2)
        axes[1, col].set_xlabel("initial lr / family default (Adam 1e-3, SGDN 1e-2, Prodigy 1)")
    for panel in (0, 1):  # every model's panel has the same optimizers, but ffn has more
        handles, labels = max((axes[panel, c].get_legend_handles_labels() for c in range(len(models))),
                              key=lambda hl: len(hl[1]))
        axes[panel, -1].legend(handles, labels, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
