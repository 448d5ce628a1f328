"""The compiled backend on CUDA tensors: the same ops as "cpp" (cpp_backend.py), whose
CUDA kernels (csrc/cuda/) are built where they can be (torch has CUDA, nvcc of its major
version is found, and a GPU is visible or TORCH_CUDA_ARCH_LIST names the architectures).

With MLHD_CUDA_ON_CPU=1 set before import, "cuda" also runs CPU tensors, through those very
kernels compiled over a CPU emulation of CUDA (csrc/cuda_on_cpu/emulation.h): the counterpart
of TRITON_INTERPRET=1, for testing the CUDA code where there is no GPU.
"""
from __future__ import annotations

import torch

from . import _extension
from . import cpp_backend

name = "cuda"


def unavailable_reason(device):
    device = torch.device(device)
    if device.type == "cpu":
        reason = _extension.emulation_error()
        return None if reason is None else f"backend 'cuda' runs on CUDA tensors ({reason})"
    if device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, not {device.type} ones"
    if not torch.cuda.is_available():
        return "torch cannot use CUDA here (a CPU-only torch build, or no GPU)"
    reason = _extension.load_error()
    if reason is None and not _extension.has_cuda_kernels():
        return f"the C++ extension was built without CUDA kernels: {_extension.without_cuda_kernels_reason()}"
    return reason


def _ops(device: torch.device):
    """The op namespace whose kernels are csrc/cuda's for tensors on `device`."""
    return torch.ops.multilevel_hd_cuda_on_cpu if device.type == "cpu" else torch.ops.multilevel_hd


def step(job) -> None:
    cpp_backend.run_step(job, _ops(job.group_state["weights"].device), "cuda")


def level_stage(job, sums):
    """Stage 2 alone, through the CUDA level-stage kernel (levels.cu)."""
    return cpp_backend.level_stage(job, sums, _ops(job.group_state["weights"].device))
