"""Smoke test of the main job: `python -m bench.train --quick` (bench/train.py, bench/digits/) into a tmp dir."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

for _module in ("sklearn", "tqdm", "matplotlib"):
    pytest.importorskip(_module, reason=f"bench.train needs {_module}: pip install -e '.[examples]'")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from bench import train  # noqa: E402
from bench.digits import loop, models, optimizers  # noqa: E402

CHANCE = 0.1  # ten balanced classes


def test_resnet_shapes_match_the_benchmark_models():
    from bench.shapes import MODELS

    assert [tuple(p.shape) for p in models.resnet50().parameters()] == MODELS["resnet50"]
    assert [tuple(p.shape) for p in models.cifar_resnet18(64, 3).parameters()] == MODELS["resnet18"]


def test_quick_mode_writes_every_row_and_learns(tmp_path):
    threads = torch.get_num_threads()
    try:
        train.main(["--quick", "--out", str(tmp_path)])
    finally:  # the comparison sets the process-wide thread count; other tests keep theirs
        torch.set_num_threads(threads)

    for name in ["digits_table.md", "digits.csv", "digits_runs.csv", "digits_accuracy.png",
                 *[f"digits_{kind}_{m}.png" for kind in ("loss", "rates") for m in optimizers.SETTINGS]]:
        assert (tmp_path / name).stat().st_size > 0, name

    with open(tmp_path / "digits.csv") as f:
        rows = list(csv.DictReader(f))
    expected = {(j.setting.name, j.spec.name, j.lr) for j in loop.plan(list(optimizers.SETTINGS), quick=True)}
    assert {(r["model"], r["optimizer"], float(r["lr"])) for r in rows} == expected
    assert len(rows) == len(expected)
    assert {r["model"] for r in rows} == set(optimizers.SETTINGS)
    for r in rows:
        assert int(r["seeds"]) == loop.QUICK_SEEDS
        assert float(r["test_acc_mean"]) > CHANCE, r

    table = (tmp_path / "digits_table.md").read_text()
    assert all(f"| {m} | {o} | {lr:g} |" in table for m, o, lr in expected)


def test_robustness_quick_mode_reports_every_optimizer(tmp_path):
    """`--robustness --quick` on the feed-forward net only (64 one-epoch runs, ~10 s): every
    planned run is in the CSV, every optimizer in both tables, and the multiplicative rule
    moves the rate the right way from both ends of the grid."""
    from bench.digits import robustness

    threads = torch.get_num_threads()
    try:
        train.main(["--robustness", "--quick", "--models", "ffn", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "digits_robustness.png").stat().st_size > 0

    with open(tmp_path / "digits_robustness_runs.csv") as f:
        rows = list(csv.DictReader(f))
    planned = {(j.spec.name, j.lr, j.seed) for j in robustness.plan(["ffn"], quick=True)}
    assert {(r["optimizer"], float(r["lr"]), int(r["seed"])) for r in rows} == planned
    assert len(rows) == len(planned)
    assert {float(r["lr_factor"]) for r in rows} == set(robustness.QUICK_FACTORS)

    names = {name for name, _, _ in planned}
    assert {"Adam (library defaults)", "SGDN (library defaults)", "Adam-CAM-HD (paper)"} <= names
    table = (tmp_path / "digits_robustness_table.md").read_text()
    assert all(table.count(f"| {name} |") == 3 for name in names)  # settings, summary, ffn tables

    ratio = {(r["optimizer"], float(r["lr_factor"])): float(r["global_rate_ratio"]) for r in rows}
    low, high = robustness.QUICK_FACTORS
    assert ratio["Adam-HDM b=0.05", low] > 1.1 and ratio["Adam-HDM b=0.05", high] < 1.0


@pytest.mark.parametrize("losses, final, expected", [
    ([2.3, 1.0, 0.5], 0.4, "ok"),
    ([2.3, 2.3, 2.3], 2.3027, "stalled"),  # never started
    ([2.3, 80.0, 2.31], 2.3027, "diverged"),  # blew up, then a dead net
    ([2.3, float("nan")], float("nan"), "diverged"),
])
def test_run_outcome(losses, final, expected):
    assert loop.Run("ffn", "Adam", 1e-3, 0, losses=losses, train_loss=final).outcome() == expected
