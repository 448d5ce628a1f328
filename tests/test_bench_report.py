"""`python -m bench.report` end to end on the `tiny` set: one well-formed table."""
import torch

from bench import report
from bench.candidates import ALL_CANDIDATES
from bench.shapes import MODELS


def test_report_writes_one_table(tmp_path, capsys):
    out = tmp_path / "cpu.md"
    report.main(["--models", "tiny", "--repeats", "2", "--out", str(out)])
    text = out.read_text()
    assert capsys.readouterr().out == text
    table = [line for line in text.splitlines() if line.startswith("|")]
    runnable = [c for c in ALL_CANDIDATES
                if c.unavailable_reason(MODELS["tiny"], torch.device("cpu")) is None]
    assert len(table) == 2 + len(runnable)
    assert all(line.count("|") == len(report.COLUMNS) + 1 for line in table)
    assert "| tiny | Adam | fused |" in text
    floor = text.split("plus fused Adam, in the same rounds, x Adam fused: tiny ")[1].split()[0]
    # fused Adam plus a read pass: at least fused Adam (on the tiny model's few kilobytes the
    # read pass is within the noise, and the ratio is printed to two decimals)
    assert float(floor) >= 1.0
