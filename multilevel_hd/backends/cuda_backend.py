"""The compiled backend on CUDA tensors: the same ops as "cpp" (cpp_backend.py), whose
CUDA kernels (csrc/cuda/) are built when torch has CUDA and nvcc is found."""
from __future__ import annotations

import torch

from . import _extension
from .cpp_backend import step  # noqa: F401  (the same three stages on either device)

name = "cuda"


def unavailable_reason(device):
    device = torch.device(device)
    if device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, not {device.type} ones"
    if not torch.cuda.is_available():
        return "torch cannot use CUDA here (a CPU-only torch build, or no GPU)"
    reason = _extension.load_error()
    if reason is None and not _extension.has_cuda_kernels():
        return "the C++ extension was built without CUDA kernels (nvcc was not found when it was compiled)"
    return reason
