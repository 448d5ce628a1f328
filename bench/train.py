"""Does multi-level hyper-gradient descent train better?  The project's main job.

Trains three models on scikit-learn's bundled handwritten digits (1,797 8x8 images, no
download; one fixed stratified 75/25 split) with Adam, SGD with Nesterov momentum, their HD
and CAM-HD variants and, when installed, Prodigy and schedule-free AdamW, over three initial
learning rates and several seeds. Writes a table (Markdown, CSV) and figures to --out.

    python -m bench.train                       the full comparison (about 20 min on one CPU thread)
    python -m bench.train --quick               smoke run, under 3 min: every model, fewer runs
    python -m bench.train --device cuda         the same on a GPU
    python -m bench.train --robustness --workers 2
                                                the lr-robustness study: x0.03 .. x30 of each family's
                                                default lr, shorter runs (34 min on a busy 2-core CPU)
    python -m bench.train --robustness --quick  its smoke run, seconds per model
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
import multiprocessing
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from bench.digits import robustness as study
from bench.digits.data import load_digits_split
from bench.digits.figures import plot_accuracy, plot_losses, plot_rates, plot_robustness
from bench.digits.loop import FULL_SEEDS, QUICK_SEEDS, Job, Run, plan, train_run, warm_up_backend
from bench.digits.optimizers import SETTINGS
from bench.digits.tables import (markdown_table, robustness_model_tables, robustness_summary_table,
                                 settings_table, summarize, sweep_tables, write_csv, write_robustness_csv)
from bench.digits.throughput import throughput

DEFAULT_OUT = Path(__file__).parent / "results"


# What forked --workers read: the jobs hold lambdas, which cannot be pickled, so the workers
# inherit the plan and the data from the parent and receive only job indices.
_FORKED: tuple = ()


def _train_forked(index: int) -> Run:
    jobs, resized, device = _FORKED
    return train_run(jobs[index], resized[jobs[index].setting.image_size], device)


def run_all(jobs: list[Job], device: torch.device, argv: list[str], workers: int = 1) -> tuple[list[Run], str]:
    """Train every job (data resized once per input size), in `workers` forked processes of
    one thread each when more than one; the runs in plan order and a header line that says how
    they were made."""
    global _FORKED
    backend = warm_up_backend(device)
    data = load_digits_split(device)
    resized = {size: data.resized(size) for size in {j.setting.image_size for j in jobs}}
    started = time.perf_counter()
    if workers > 1:
        _FORKED = (jobs, resized, device)
        with multiprocessing.get_context("fork").Pool(workers, torch.set_num_threads, (1,)) as pool:
            runs = list(tqdm(pool.imap(_train_forked, range(len(jobs))), total=len(jobs), desc="runs"))
        _FORKED = ()
    else:
        runs = []
        bar = tqdm(jobs, desc="runs")
        for job in bar:
            bar.set_postfix_str(f"{job.setting.name} {job.spec.name} lr={job.lr:g} seed={job.seed}")
            runs.append(train_run(job, resized[job.setting.image_size], device))
    minutes = (time.perf_counter() - started) / 60
    how = f"{workers} processes of 1 thread" if workers > 1 else f"{torch.get_num_threads()} threads"
    header = (f"`{shlex.join(['python', '-m', 'bench.train', *argv])}`: {len(runs)} runs in {minutes:.1f} min "
              f"on {device} ({how}), torch {torch.__version__}, multilevel_hd backend {backend!r}.")
    return runs, header


def compare(args, argv: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(args.models.split(","), args.quick, args.seeds)
    settings_md = settings_table(jobs)
    print(settings_md, flush=True)
    runs, header = run_all(jobs, torch.device(args.device), argv, args.workers)
    write_report(runs, settings_md, header, out)


def robustness(args, argv: list[str]) -> None:
    """The lr-robustness study: digits_robustness_table.md, digits_robustness_runs.csv and
    digits_robustness.png in --out; the tables also go to stdout."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = study.plan(args.models.split(","), args.quick, args.seeds)
    settings_md = settings_table(jobs)
    print(settings_md, flush=True)
    runs, header = run_all(jobs, torch.device(args.device), argv, args.workers)
    stats = study.robustness(runs, study.QUICK_FACTORS if args.quick else study.FACTORS)
    tables = (f"## Worst case over the lr grid (mean over seeds at the worst lr)\n\n{robustness_summary_table(stats)}"
              f"\n\n## Per model\n\n{robustness_model_tables(stats)}")
    (out / "digits_robustness_table.md").write_text(f"{header}\n\n## Settings\n\n{settings_md}\n\n{tables}")
    write_robustness_csv(stats, out / "digits_robustness_runs.csv")
    plot_robustness(stats, out / "digits_robustness.png")
    print(f"\n{tables}\n{header}\nwrote {out}/digits_robustness*")


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



def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: every model, fewer epochs, seeds, optimizers")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for tables and figures")
    ap.add_argument("--models", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--seeds", type=int, help=f"seeds per setting (default {FULL_SEEDS}, --quick {QUICK_SEEDS}; "
                                                     f"--robustness {study.SEEDS}, with --quick {study.QUICK_SEEDS})")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: the digits models are too small to gain from more, "
                         "and on a shared machine 2 threads ran 2-10x slower)")
    ap.add_argument("--workers", type=int, default=1,
                    help="CPU runs in this many forked processes of one thread each (default 1); "
                         "--workers 2 fills a 2-core machine")
    ap.add_argument("--robustness", action="store_true",
                    help="the lr-robustness study (x0.03 .. x30 of each family's default lr); with --quick its smoke run")
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
    if args.workers < 1 or (args.workers > 1 and torch.device(args.device).type != "cpu"):
        ap.error("--workers must be 1, or more on --device cpu")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    (throughput if args.throughput else robustness if args.robustness else compare)(args, argv)


if __name__ == "__main__":
    main()
