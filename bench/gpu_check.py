"""The Python stages of bench/gpu_check.sh (one prepared run on a lent GPU, or its CPU dry
run). Each subcommand prints what it found and exits non-zero when the stage failed.

    python -m bench.gpu_check preflight --device cuda|cpu   versions; fails without a GPU
    python -m bench.gpu_check build --device cuda|cpu       builds the extension, then fails
                                                            loudly unless every required
                                                            backend is available
    python -m bench.gpu_check sanitize --device cuda|cpu    compute-sanitizer memcheck and
                                                            racecheck of `sanitize-target`
    python -m bench.gpu_check sanitize-target --device D    a few tiny steps of every backend
    python -m bench.gpu_check summary --mode cuda|cpu --out DIR
                                                            DIR/gpu.md from the stages' files
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Backends that must run for the check to mean anything. On the CPU the compiled ops are
# the cpp backend's and the cuda backend's emulated (gpu_check.sh sets MLHD_CUDA_ON_CPU=1).
REQUIRED = {"cuda": ("torch", "triton", "cuda"), "cpu": ("torch", "triton", "cpp", "cuda")}
SHOWN = ("torch", "triton", "cuda", "cpp")


def _tool(name: str) -> str | None:
    """A CUDA tool on PATH, else in the toolkit torch found (CUDA_HOME/bin)."""
    found = shutil.which(name)
    if found is None:
        from torch.utils import cpp_extension

        home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
        candidate = os.path.join(home, "bin", name)
        found = candidate if os.access(candidate, os.X_OK) else None
    return found


def _version_line(cmd: list[str]) -> str:
    """The line of `cmd`'s output that names the version ("release 13.0", "Version 2025.3")."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"cannot run: {err}"
    return next((line.strip() for line in out if "release" in line or "Version" in line), out[-1] if out else "?")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def preflight(args) -> int:
    import torch
    from torch.utils import cpp_extension

    print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}), {platform.machine()}")
    try:
        import triton
        print(f"triton {triton.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    except ImportError as err:
        print(f"triton: NOT IMPORTABLE ({err})")
    nvcc, sanitizer = _tool("nvcc"), _tool("compute-sanitizer")
    print(f"nvcc: {_version_line([nvcc, '--version']) if nvcc else 'not found'} ({nvcc}); "
          f"CUDA_HOME {cpp_extension.CUDA_HOME}; ninja {'yes' if cpp_extension.is_ninja_available() else 'NO'}; "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r}")
    print(f"compute-sanitizer: {_version_line([sanitizer, '--version']) if sanitizer else 'not found'}")
    print("modules: " + ", ".join(f"{m} {'yes' if _has(m) else 'no'}"
                                  for m in ("pytest", "hypothesis", "xdist", "torchvision", "tqdm", "numpy")))
    if args.device == "cpu":
        print(f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
        return 0
    if not torch.cuda.is_available():
        print("PREFLIGHT FAILED: torch sees no CUDA device; nothing else can run")
        return 1
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    print(f"GPU: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{total / 2**30:.0f} GiB ({free / 2**30:.0f} GiB free), torch arch list {torch.cuda.get_arch_list()}")
    return 0


BUILD_FAILED = 2  # exit status when the extension itself did not build (1: a backend is missing)


def build(args) -> int:
    """Build (or load the cached build of) the extension, timed, with the compiler's whole
    output on failure; then every required backend must be available on the device."""
    import torch

    from multilevel_hd.backends import _extension, unavailable_reason

    device = torch.device(args.device)
    required = [b for b in (args.require or ",".join(REQUIRED[device.type])).split(",") if b]
    start = time.perf_counter()
    try:
        _extension._load()
        build_error = None
    except Exception as err:  # the whole message: a compile error is in it
        traceback.print_exc()
        build_error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"extension: {'built/loaded' if build_error is None else 'BUILD FAILED'} in "
          f"{time.perf_counter() - start:.1f} s (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r})")
    missing = []
    for name in SHOWN:
        if build_error is not None and name in ("cuda", "cpp"):
            reason = f"the C++ extension did not build: {build_error}"  # asking again would rebuild
        else:
            reason = unavailable_reason(name, device)
        flag = "available" if reason is None else f"unavailable: {reason}"
        if reason is not None and name in required:
            missing.append(name)
            flag = "UNAVAILABLE (required): " + reason
        print(f"backend {name} on {device.type}: {flag}")
    if missing:
        print(f"BUILD STAGE FAILED: required backend(s) {', '.join(missing)} cannot run on {device.type}; "
              "the tests would silently leave them out")
        return BUILD_FAILED if build_error is not None else 1
    return 0


# ------------------------------------------------------------------------------ sanitizer
def sanitize_target(args) -> int:
    """A few steps of every available fast backend on tiny odd shapes (one 0-d, one
    transposed, one spanning several blocks), float32 and bf16, a NaN step among them:
    every kernel runs at least once, small enough for compute-sanitizer."""
    import torch

    import multilevel_hd as mlhd
    from multilevel_hd.backends import available_backends

    device = torch.device(args.device)
    backends = [b for b in available_backends(device) if b != "reference"]
    shapes = [(), (7,), (5, 3, 3, 3), (3, 5000), (6, 4)]
    configs = [
        (mlhd.MultiLevelAdam, torch.float32, dict(levels=("global", "layer", "unit", "param"))),
        (mlhd.MultiLevelSGD, torch.bfloat16, dict(momentum=0.9, nesterov=True, hypergrad_rule="multiplicative",
                                                  hypergrad_lr=0.01)),
    ]
    gen = torch.Generator().manual_seed(0)
    for backend in backends:
        for cls, dtype, kwargs in configs:
            params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
            params[-1] = params[-1].t()  # a transposed view: the compiled backends stage it
            params = [p.requires_grad_() for p in params]
            opt = cls(params, lr=1e-3, backend=backend, **kwargs)
            for step in range(4):
                for p in params:  # gradients in their parameter's layout, as autograd makes them
                    p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
                if step == 2:
                    params[1].grad.view(-1)[3] = float("nan")  # the device-side skip
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            assert opt.skipped_steps() == [1], (backend, opt.skipped_steps())
            assert all(torch.isfinite(p).all() for p in params), backend
        print(f"sanitize-target: {backend}: {len(configs)} configs x 4 steps ok", flush=True)
    return 0


def _sanitizer_verdict(tool: str, rc: int | None, output: str) -> tuple[bool, str]:
    """(passed, one line) from a compute-sanitizer run."""
    summary = next((line.strip("= ").strip() for line in output.splitlines()
                    if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line), "no summary")
    if rc is None:
        return False, f"{tool}: TIMED OUT ({summary})"
    if "Device not supported" in output or "Unable to find injection library" in output:
        return True, f"{tool}: skipped: compute-sanitizer cannot attach on this machine"
    if rc == 0:
        return True, f"{tool}: clean ({summary})"
    return False, f"{tool}: FAILED, rc {rc} ({summary})"


def sanitize(args) -> int:
    """memcheck and racecheck of `sanitize-target`, both at once, within --timeout; on the
    CPU (or without compute-sanitizer) the target runs bare, so that it is proven too."""
    deadline = time.monotonic() + args.timeout
    target = [sys.executable, "-m", "bench.gpu_check", "sanitize-target", "--device", args.device]
    sanitizer = _tool("compute-sanitizer") if args.device == "cuda" else None
    if sanitizer is None:
        print("compute-sanitizer: " + ("not run on the CPU" if args.device == "cpu" else
                                       "not found on PATH or in CUDA_HOME/bin: memcheck and racecheck SKIPPED")
              + "; the target runs bare", flush=True)
        try:
            return subprocess.run(target, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            print("sanitize-target: TIMED OUT")
            return 1
    # memcheck without the caching allocator: every tensor is its own allocation, so an
    # access past a tensor's end leaves the allocation instead of landing in a neighbour.
    runs = {
        "memcheck": ([sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20", *target],
                     {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        "racecheck": ([sanitizer, "--tool", "racecheck", "--error-exitcode", "1", "--print-limit", "20", *target],
                      {}),
    }
    # both at once (each is mostly the sanitizer's own start-up, not GPU work); output to
    # files, since a full pipe would stall the one not being read
    logs = {tool: tempfile.TemporaryFile("w+") for tool in runs}
    procs = {tool: subprocess.Popen(cmd, env={**os.environ, **env}, stdout=logs[tool], stderr=subprocess.STDOUT)
             for tool, (cmd, env) in runs.items()}
    passed = True
    for tool, proc in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        logs[tool].seek(0)
        output = logs[tool].read()
        ok, line = _sanitizer_verdict(tool, rc, output)
        print(f"----- {tool} output (last 40 lines)\n" + "\n".join(output.splitlines()[-40:]))
        print(line, flush=True)
        passed &= ok
    return 0 if passed else 1


# ------------------------------------------------------------------------------ gpu.md
PIECES = (  # (file in --out, heading, the stage that writes it)
    ("report.md", "Optimizer step on ResNet-50 shapes", "report"),
    ("throughput_{device}.md", "ResNet-50 training step, synthetic batch", "throughput"),
    ("compile.md", "torch.compile of the torch backend's step", "compile"),
)


def _stage_output(log: Path, name: str) -> list[str]:
    """The lines a stage wrote into gpu_check.log."""
    if not log.exists():
        return []
    text = log.read_text(errors="replace")
    start = text.find(f"\n===== stage {name} ")
    if start < 0:
        return []
    body = text[start + 1:].split("\n", 1)[1] if "\n" in text[start + 1:] else ""
    return body.split("\n===== stage ", 1)[0].strip().splitlines()


def summary(args) -> int:
    """gpu.md from the stages' files; imports no torch (the stage's limit is 5 s): the
    machine's description comes from the preflight's lines in gpu_check.log."""
    out = Path(args.out)
    device = "cuda" if args.mode == "cuda" else "cpu"
    stages = []
    if (out / "stages.tsv").exists():
        stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines() if line.strip()]
    machine = [line for line in _stage_output(out / "gpu_check.log", "preflight")
               if line.startswith(("python ", "triton", "nvcc", "compute-sanitizer", "GPU:", "CPU:"))]
    tests = {name: lines[-1].strip("= ") for name in ("gpu-tests", "conformance")
             if (lines := _stage_output(out / "gpu_check.log", name)) and " in " in lines[-1]}
    lines = [
        "# multilevel_hd on a GPU: `bash bench/gpu_check.sh" + (" --cpu" if args.mode == "cpu" else "") + "`",
        "",
        f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        + ("" if args.mode == "cuda" else ": the CPU dry run, not GPU numbers"),
        *[f"- {line}" for line in machine],
        "- stages (limit / took, seconds): " + "; ".join(f"{s[0]} {s[1]}/{s[2]} {s[3]}" for s in stages),
        *[f"- {name}: {line}" for name, line in tests.items()],
        "",
    ]
    for name, heading, stage in PIECES:
        path = out / name.format(device=device)
        lines += [f"## {heading}" + ("" if args.mode == "cuda" else " (dry run: tiny shapes)"), ""]
        if path.exists():
            # the pieces are whole reports: their own headings go one level down
            lines += [("##" + line) if line.startswith("# ") else line for line in path.read_text().splitlines()]
        else:
            lines.append(f"(not produced: the {stage} stage failed or was cut short; see gpu_check.log)")
        lines.append("")
    text = "\n".join(lines)
    (out / "gpu.md").write_text(text)
    print(text)
    if args.mode == "cuda":
        (REPO / "bench" / "results" / "gpu.md").write_text(text)
        print("wrote bench/results/gpu.md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("preflight", "build", "sanitize", "sanitize-target"):
        p = sub.add_parser(name)
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        if name == "build":
            p.add_argument("--require", default=os.environ.get("MLHD_GPU_CHECK_REQUIRE"),
                           help="comma list of backends that must be available "
                                "(default: torch,triton,cuda on cuda; torch,triton,cpp,cuda on cpu)")
        if name == "sanitize":
            p.add_argument("--timeout", type=float, default=60.0, help="seconds for both sanitizer runs")
    p = sub.add_parser("summary")
    p.add_argument("--mode", choices=("cuda", "cpu"), required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    command = {"preflight": preflight, "build": build, "sanitize": sanitize,
               "sanitize-target": sanitize_target, "summary": summary}[args.command]
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
