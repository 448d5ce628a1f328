"""Where the compiled backend's sources live, how they are compiled, and whether its CUDA
kernels are: shared by the JIT loader (_extension.py) and setup.py, which loads this file by
path, without importing the package (whose __init__ imports torch)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(PACKAGE)
# An install carries the sources as package data (setup.py maps the top-level csrc/ to
# multilevel_hd/csrc); a checkout (editable install, PYTHONPATH=.) has them at the top.
CSRC = next((d for d in (os.path.join(PACKAGE, "csrc"), os.path.join(ROOT, "csrc")) if os.path.isdir(d)),
            os.path.join(PACKAGE, "csrc"))
# Exact IEEE math (no -ffast-math: the kernels must match the reference to 1e-10 in float64);
# without errno and traps, sqrt and selects vectorise. at::parallel_for is inline code
# around `#pragma omp parallel` in an OpenMP build of torch (Linux wheels), so without
# -fopenmp it runs on one thread; the library then shares torch's libgomp.so.1.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", *OPENMP]
LD_FLAGS = OPENMP
NVCC_FLAGS = ["-O3"]
# The CUDA kernels run on the CPU (csrc/cuda_on_cpu/emulation.h): the same .cu files compiled
# as host C++, registered as torch.ops.multilevel_hd_cuda_on_cpu. Hidden symbols, so that the
# mlhd:: functions it shares with the main library never resolve to the other library's copy.
EMULATION_FLAGS = ["-DMLHD_CUDA_ON_CPU", "-fvisibility=hidden"]


def sources(with_cuda: bool, root: str = CSRC) -> list[str]:
    """The files of multilevel_hd._C; the CUDA ones only for a torch built with CUDA."""
    files = ["ops.cpp", "cpu/step.cpp", "cpu/adam_reduce_simd.cpp", "cpu/levels.cpp"]
    if with_cuda:
        files += ["cuda/binding.cpp", "cuda/step.cu", "cuda/levels.cu"]
    return [os.path.join(root, f) for f in files]


def emulation_sources(root: str = CSRC) -> list[str]:
    """The files of the CUDA-on-CPU library: the shared op code, the CUDA binding, the emulation
    and the .cu files (included by .cpp wrappers, since a .cu source would go to nvcc)."""
    files = ["ops.cpp", "cuda/binding.cpp", "cuda_on_cpu/emulation.cpp", "cuda_on_cpu/capture.cpp",
             "cuda_on_cpu/step.cpp", "cuda_on_cpu/levels.cpp"]
    return [os.path.join(root, f) for f in files]


def decide_cuda(torch_cuda: str | None, gpus: int, arch_list: str | None, nvcc: str | None,
                nvcc_release: str | None) -> tuple[bool, str]:
    """Whether to compile the CUDA kernels into the library, and why (or why not). They can
    only be built where torch has CUDA (`torch_cuda`: torch.version.cuda), for an architecture
    that is known: a visible GPU's, or TORCH_CUDA_ARCH_LIST (`arch_list`; without either,
    torch's arch detection fails), by an nvcc (`nvcc`: its path, None when there is none)
    whose major CUDA version is torch's (`nvcc_release`: "13.0"; torch refuses another).
    Otherwise the library has the CPU ops alone, which is what the cpp backend needs."""
    if torch_cuda is None:
        return False, "this torch is built without CUDA"
    if gpus == 0 and not arch_list:
        return False, (f"torch has CUDA {torch_cuda} but no GPU is visible and TORCH_CUDA_ARCH_LIST is not "
                       "set (set it, e.g. TORCH_CUDA_ARCH_LIST=9.0, to compile the CUDA kernels too)")
    if nvcc is None:
        return False, (f"torch has CUDA {torch_cuda} but nvcc is not found (torch looks in $CUDA_HOME/bin, "
                       "then on PATH, then in /usr/local/cuda/bin)")
    if nvcc_release is not None and nvcc_release.split(".")[0] != torch_cuda.split(".")[0]:
        return False, (f"{nvcc} is CUDA {nvcc_release}, but torch was built with CUDA {torch_cuda} and a "
                       "different major version cannot build for it (set CUDA_HOME to a matching toolkit)")
    target = f"TORCH_CUDA_ARCH_LIST={arch_list}" if arch_list else f"the {gpus} visible GPU(s)"
    return True, f"CUDA {torch_cuda} kernels for {target}, compiled by {nvcc}"


def cuda_inputs() -> dict:
    """decide_cuda's arguments on this machine, as torch's extension builder sees them."""
    import torch
    from torch.utils import cpp_extension

    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    if nvcc is not None and not os.access(nvcc, os.X_OK):
        nvcc = None
    has_cuda = torch.version.cuda is not None
    return {"torch_cuda": torch.version.cuda, "gpus": torch.cuda.device_count() if has_cuda else 0,
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") or None, "nvcc": nvcc,
            "nvcc_release": _release(nvcc) if nvcc and has_cuda else None}


def _release(nvcc: str) -> str | None:
    """The CUDA version an nvcc reports ("release 13.0"), as torch reads it; None if it says none."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def cuda_runtime_dir(parent: str) -> str | None:
    """A folder under `parent` whose libcudart.so is the CUDA runtime this process has loaded,
    for the linker to search first; None where there is none to point at (not Linux, or a
    torch with the runtime built in: torch's own flags then stand).

    torch's extension builder links `-lcudart` from $CUDA_HOME/lib64, CUDA_HOME guessed from
    where nvcc is on PATH: a wrapper script in /usr/local/bin gives /usr/local/lib64, which
    has no libcudart, and pip's torch brings its runtime as libcudart.so.N only (the
    nvidia-cuda-runtime wheel). Linked against the runtime torch runs with, the kernels use
    that one, whichever toolkit compiled them."""
    runtime = _loaded_cuda_runtime()
    if runtime is None:
        return None
    folder = os.path.join(parent, "cudart")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, "libcudart.so")
    if os.path.realpath(link) != os.path.realpath(runtime):
        fresh = f"{link}.{os.getpid()}"  # replaced in one step: a concurrent build never sees none
        os.symlink(runtime, fresh)
        os.replace(fresh, link)
    return folder


def _loaded_cuda_runtime() -> str | None:
    """The libcudart.so.N in this process's memory map (a torch with CUDA loads it with itself)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "/libcudart.so" in line}
    except OSError:
        return None
    return min(paths) if paths else None
