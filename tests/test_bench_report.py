"""`python -m bench.report` end to end on the `tiny` set: the step table and the stage table,
well formed; the parts of the report that the end-to-end run cannot vary (the CPU description
on other machines, the stage timing's effect on a step) on their own."""
import time

import pytest
import torch

import multilevel_hd
from bench import machine, report
from bench.candidates import ALL_CANDIDATES, STAGED
from bench.shapes import MODELS
from bench.stages import STAGES, timed_stages
from multilevel_hd.backends import available_backends, cpp_backend
from test_torch_optim_suite import equal

HAS_CPP = "cpp" in available_backends("cpu")


def test_report_writes_one_table(tmp_path, capsys):
    out = tmp_path / "report.md"
    report.main(["--models", "tiny", "--repeats", "2", "--out", str(out)])
    text = out.read_text()
    assert capsys.readouterr().out == text
    steps, _, stages = text.partition("Stages of the compiled CPU step")
    table = [line for line in steps.splitlines() if line.startswith("|")]
    runnable = [c for c in ALL_CANDIDATES
                if c.unavailable_reason(MODELS["tiny"], torch.device("cpu")) is None]
    assert len(table) == 2 + len(runnable)
    assert all(line.count("|") == len(report.COLUMNS) + 1 for line in table)
    assert "| tiny | Adam | fused |" in text
    floor = text.split("plus fused Adam, in the same rounds, x Adam fused: tiny ")[1].split()[0]
    # fused Adam plus a read pass: at least fused Adam (on the tiny model's few kilobytes the
    # read pass is within the noise, and the ratio is printed to two decimals)
    assert float(floor) >= 1.0
    assert f"- {machine.cpu_info().describe()}" in text

    staged = [c for c in STAGED if c in runnable]
    stage_table = [line for line in stages.splitlines() if line.startswith("|")]
    if not staged:
        assert stage_table == []
        return
    # the floor's three parts, then per staged step: its 3 stages, the rest, the plain step
    assert len(stage_table) == 2 + 3 + 5 * len(staged)
    assert all(line.count("|") == len(report.STAGE_COLUMNS) + 1 for line in stage_table)
    for cand in staged:
        label = f"| tiny | {cand.config.label} {cand.label} |"
        ms = {line.split("|")[3].strip(): float(line.split("|")[4]) for line in stage_table if line.startswith(label)}
        assert list(ms) == [*STAGES, report.HOST_PART, "step() (the table's)"]
        assert all(ms[stage] > 0 for stage in STAGES)


CPUINFO_INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_fp16
"""
LSCPU_INTEL = """Vendor ID:                GenuineIntel
Model name:               Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
Thread(s) per core:       2
L3 cache:                 105 MiB (1 instance)
"""
CPUINFO_AARCH64 = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve
CPU implementer\t: 0x41
"""
LSCPU_AARCH64 = """Vendor ID:           ARM
Model name:          Neoverse-V1
Thread(s) per core:  1
"""


def test_cpu_description_from_cpuinfo_and_lscpu():
    intel = machine.parse(CPUINFO_INTEL, LSCPU_INTEL)
    assert (intel.vendor, intel.flags, intel.threads_per_core) == ("intel", ("avx512f", "avx512_bf16", "avx2", "fma"), 2)
    assert intel.model.startswith("Intel(R) Xeon(R)") and intel.l3 == "105 MiB (1 instance)"
    assert "hyper-threads" in intel.describe()
    arm = machine.parse(CPUINFO_AARCH64, LSCPU_AARCH64)
    assert (arm.vendor, arm.model, arm.flags, arm.threads_per_core) == ("arm", "Neoverse-V1", ("asimd", "sve"), 1)


def test_cpu_description_without_cpuinfo_or_lscpu():
    """macOS, or a container without lscpu: what cannot be known says so."""
    bare = machine.parse(None, None)
    assert bare.flags is None and bare.threads_per_core is None and bare.l3 is None
    line = bare.describe()
    assert "vector ISA: unknown" in line and "threads per core unknown" in line and "L3 unknown" in line
    assert bare.torch_capability == torch.backends.cpu.get_cpu_capability()


@pytest.mark.skipif(not HAS_CPP, reason="the cpp backend is unavailable here")
def test_timed_stages_leave_the_step_unchanged():
    """A step taken inside timed_stages is bit for bit the plain step (the wrapped ops are the
    real ones, each called once), every stage is timed, and the backend is restored after."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (10, 64)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    plain, timed = ([p.clone().requires_grad_() for p in init] for _ in range(2))
    opts = [multilevel_hd.MultiLevelAdam(ps, lr=1e-2, levels=("global", "layer", "param"), backend="cpp")
            for ps in (plain, timed)]
    run_step = cpp_backend.run_step
    for step_grads in grads:
        for ps in (plain, timed):
            for p, g in zip(ps, step_grads):
                p.grad = g
        opts[0].step()
        start = time.perf_counter()
        with timed_stages() as seconds:
            opts[1].step()
        elapsed = time.perf_counter() - start
        assert cpp_backend.run_step is run_step
        assert all(seconds[stage] > 0 for stage in STAGES) and sum(seconds.values()) <= elapsed
    assert all(torch.equal(a, b) for a, b in zip(plain, timed))
    assert equal(opts[0].state_dict(), opts[1].state_dict())  # state, rates, weights
