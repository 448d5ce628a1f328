"""Where the compiled backend's sources live and how they are compiled: shared by the JIT
loader (_extension.py) and setup.py, which loads this file by path, without importing the
package (whose __init__ imports torch)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
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
    files = ["ops.cpp", "cpu/step.cpp", "cpu/levels.cpp"]
    if with_cuda:
        files += ["cuda/binding.cpp", "cuda/step.cu", "cuda/levels.cu"]
    return [os.path.join(root, f) for f in files]


def emulation_sources(root: str = CSRC) -> list[str]:
    """The files of the CUDA-on-CPU library: the shared op code, the CUDA binding, the emulation
    and the .cu files (included by .cpp wrappers, since a .cu source would go to nvcc)."""
    files = ["ops.cpp", "cuda/binding.cpp", "cuda_on_cpu/emulation.cpp", "cuda_on_cpu/capture.cpp",
             "cuda_on_cpu/step.cpp", "cuda_on_cpu/levels.cpp"]
    return [os.path.join(root, f) for f in files]
