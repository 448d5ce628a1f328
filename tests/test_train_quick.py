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
