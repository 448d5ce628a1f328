"""bench/gpu_check.sh, the prepared GPU run, proven on the CPU before it spends device time.

* The cheapest meaningful part of its CPU dry run (`--cpu`): the preflight, the build stage
  with its backend check, the sanitizer's target (a few steps of every backend) and the
  summary, through the script's own stage runner, into a tmp $OUT (about 30 s once the
  extension is built; `bash bench/gpu_check.sh --cpu` runs every stage, some 6 minutes).
* A required backend that cannot run fails the run loudly instead of dropping out.
* The GPU run's stage limits fit its 5 minutes, and both modes run the same stages.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
GPU_BUDGET_S = 290  # of the device run's 5 minutes; the rest is python's start-up and copies

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the script needs bash and coreutils' timeout")


def run_script(tmp_path, stages: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_STAGES": stages, **env}
    env.pop("MLHD_TEST_BACKENDS", None)
    return subprocess.run(["bash", str(SCRIPT), "--cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def stage_limits(mode: str) -> dict[str, int]:
    """NAME -> limit of each `stage NAME LIMIT ...` call in the script's branch for `mode`."""
    text = SCRIPT.read_text()
    cuda, cpu = text.split("if [ $mode = cuda ]; then\n    # limits", 1)[1].split("\nelse\n", 1)
    branch = cuda if mode == "cuda" else cpu.split("\nfi\n", 1)[0]
    return {name: int(limit) for name, limit in re.findall(r"\bstage ([\w-]+) (\d+) ", branch)}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_stage_limits_fit_the_budget_and_the_modes_match():
    gpu, cpu = stage_limits("cuda"), stage_limits("cpu")
    assert sum(gpu.values()) <= GPU_BUDGET_S, gpu
    assert set(gpu) == set(cpu) - {"sm90-compile"}, (gpu, cpu)  # the dry run runs what the GPU runs
    for name in ("preflight", "build", "gpu-tests", "conformance", "report", "throughput", "compile",
                 "sanitize", "summary"):
        assert name in gpu


def test_cpu_dry_run_of_the_cheap_stages(tmp_path):
    done = run_script(tmp_path, "preflight,build,sanitize,summary")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.strip().splitlines()[-1].startswith("gpu_check (cpu): all steps passed"), output
    for name in ("preflight", "build", "sanitize", "summary"):  # a start line and a result line each
        assert re.search(rf"^== {name}: started at \+\d+ s, limit \d+ s", output, re.M), name
        assert re.search(rf"^== {name}: passed after \d+ s", output, re.M), name
    stages = [line.split("\t") for line in (tmp_path / "stages.tsv").read_text().splitlines()]
    assert [s[0] for s in stages] == ["preflight", "build", "sanitize", "summary"]
    assert all(s[3] == "passed" for s in stages)
    log = (tmp_path / "gpu_check.log").read_text()
    assert "backend triton on cpu: available" in log and "sanitize-target: triton:" in log
    gpu_md = (tmp_path / "gpu.md").read_text()
    assert "the CPU dry run, not GPU numbers" in gpu_md
    assert "(not produced: the report stage failed or was cut short" in gpu_md  # stage not run here


def test_a_missing_required_backend_fails_loudly(tmp_path):
    done = run_script(tmp_path, "preflight,build", MLHD_CUDA_ON_CPU="0")  # no emulated cuda: required on cpu
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "BUILD STAGE FAILED: required backend(s) cuda cannot run on cpu" in output
    assert "== build: FAILED (exit 1)" in output
    assert output.strip().splitlines()[-1].startswith("gpu_check (cpu): SOME STEPS FAILED: build"), output


def test_sanitizer_verdicts():
    from bench.gpu_check import _sanitizer_verdict

    assert _sanitizer_verdict("memcheck", 0, "========= ERROR SUMMARY: 0 errors\n") == \
        (True, "memcheck: clean (ERROR SUMMARY: 0 errors)")
    ok, line = _sanitizer_verdict("racecheck", 1, "========= RACECHECK SUMMARY: 1 hazard displayed (1 error)\n")
    assert not ok and "FAILED" in line and "1 hazard" in line
    assert not _sanitizer_verdict("memcheck", None, "")[0]  # timed out: not checked
    ok, line = _sanitizer_verdict("memcheck", 1, "========= Error: Device not supported\n")
    assert ok and "skipped" in line  # gVisor machines refuse the sanitizer: reported, not failed


def test_gpu_summary_writes_gpu_md_and_the_committed_copy(tmp_path, monkeypatch):
    """The GPU mode's summary, on files shaped like a GPU run's (torch is not imported)."""
    from bench import gpu_check

    out, repo = tmp_path / "out", tmp_path / "repo"
    out.mkdir()
    (repo / "bench" / "results").mkdir(parents=True)
    monkeypatch.setattr(gpu_check, "REPO", repo)
    (out / "gpu_check.log").write_text(
        "\n===== stage preflight (limit 15 s): python3 -m bench.gpu_check preflight --device cuda\n"
        "python 3.12.3 (/opt/torch/.venv/bin/python3), torch 2.11.0+cu130 (CUDA 13.0), x86_64\n"
        "GPU: NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79 GiB (78 GiB free), torch arch list ['sm_90']\n"
        "\n===== stage gpu-tests (limit 45 s): python3 -m pytest -v\n[gw0] PASSED tests/test_amp.py::x\n"
        "=========== short test summary info ===========\n===== 170 passed, 3 skipped in 40.1s =====\n")
    (out / "stages.tsv").write_text("preflight\t15\t4\tpassed\ngpu-tests\t45\t41\tpassed\n")
    (out / "report.md").write_text("# multilevel_hd optimizer step benchmark\n\n| model |\n|---|\n| resnet50 |\n")
    assert gpu_check.main(["summary", "--mode", "cuda", "--out", str(out)]) == 0
    text = (out / "gpu.md").read_text()
    assert text == (repo / "bench" / "results" / "gpu.md").read_text()
    assert "- GPU: NVIDIA H100 80GB HBM3, sm_90" in text and "dry run" not in text
    assert "- gpu-tests: 170 passed, 3 skipped in 40.1s" in text
    assert "preflight 15/4 passed; gpu-tests 45/41 passed" in text
    assert "### multilevel_hd optimizer step benchmark" in text and "| resnet50 |" in text
    assert "(not produced: the throughput stage" in text and "(not produced: the compile stage" in text
