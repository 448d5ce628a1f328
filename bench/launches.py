"""Kernel launches per optimizer step, for each benchmark candidate and model.

    python -m bench.launches [--device cuda|cpu] [--models resnet50,resnet152]

On CUDA, torch.profiler counts the kernels and host-device copies one warmed-up step
launches; a fused backend's count must not grow with the number of tensors (compare
resnet50's 161 tensors with resnet152's 467). It also reports, per compiled Triton kernel,
its 16-byte (v4) against its scalar global loads, from the PTX. On the CPU it counts the
ATen operations a step dispatches (`count_dispatched_ops`; a torch._foreach_* operation
counts once, as it is one launch on a GPU) and the triton backend's own launch counter.
"""
from __future__ import annotations

import argparse
import collections
import re

import torch
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode

from .candidates import ALL_CANDIDATES, Live
from .shapes import MODELS, make_grads, make_params


def _warm_live(cand, shapes, device) -> Live:
    params = make_params(shapes, device)
    live = Live(cand, params, [make_grads(shapes, device, seed=seed) for seed in (1, 2)])
    for _ in range(3):  # compilation, plan and tables
        live.feed()
        live.step()
    return live


def count_cuda(live: Live) -> tuple[int, int]:
    """(kernels, memory copies and sets) of one step, fresh gradients included."""
    torch.cuda.synchronize()
    live.feed()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        live.step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = sum(1 for e in events if e.name.startswith(("Memcpy", "Memset")))
    return len(events) - copies, copies


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(fn) -> collections.Counter:
    """How many times `fn()` dispatches each ATen operation (views and host reads included)."""
    with _OpCounter() as counter:
        fn()
    return counter.counts


def ptx_loads() -> list[str]:
    """Per compiled Triton kernel of multilevel_hd: its v4 and its scalar global loads."""
    from multilevel_hd.backends import triton_tables

    lines = []
    for kernel in (triton_tables.reduce.reduce_kernel, triton_tables.step.step_kernel):
        for caches in kernel.device_caches.values():
            for compiled in caches[0].values():
                ptx = compiled.asm["ptx"]
                v4 = len(re.findall(r"ld\.global\S*\.v4\.", ptx))
                scalar = len(re.findall(r"ld\.global(?:\.(?!v\d)[\w:]+)*\.[bfu]32\s", ptx))
                lines.append(f"{compiled.name}: {v4} v4 loads, {scalar} 32-bit loads")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--models", default="resnet50,resnet152")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from multilevel_hd.backends import triton_backend

    ops = "kernels" if device.type == "cuda" else "ATen ops"
    print(f"| model | tensors | optimizer | backend | {ops} / step | copies / step | Triton launches |")
    print("|---|---:|---|---|---:|---:|---:|")
    for model in args.models.split(","):
        shapes = MODELS[model]
        for cand in ALL_CANDIDATES:
            if cand.unavailable_reason(shapes, device) is not None or cand.backend == "reference":
                continue
            live = _warm_live(cand, shapes, device)
            if device.type == "cuda":
                kernels, copies = count_cuda(live)
            else:
                live.feed()
                kernels, copies = sum(count_dispatched_ops(live.step).values()), "-"
            triton = triton_backend.launches_last_step if cand.backend == "triton" else "-"
            print(f"| {model} | {len(shapes)} | {cand.config.label} | {cand.backend} | {kernels} | {copies} | {triton} |",
                  flush=True)
            del live
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type == "cuda":
        print("\nPTX global loads per compiled kernel (v4 = 16-byte accesses):")
        print("\n".join(ptx_loads()))


if __name__ == "__main__":
    main()
