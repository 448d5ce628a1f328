"""Compile the triton backend's kernels for a GPU on a machine without one.

    TRITON_INTERPRET=0 python -m bench.compile_check [--arch 90]

Steps optimizers of many configurations on CPU tensors with the kernel launches captured
instead of run, then compiles every captured (kernel, signature, switches) variant for
the CUDA target with Triton's own compiler and ptxas. The interpreter that runs the
test suite on the CPU accepts code that the compiler rejects (non-constexpr globals,
loop-carried types, ...), so this catches such errors before a GPU is spent on them. It
also counts each variant's 16-byte (v4) and 32-bit global loads in the PTX: the full
chunks of the step kernel and the WIDE4 reduction tiles should use 16-byte loads.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

ALL_LEVELS = ("global", "layer", "unit", "param")
# (optimizer class name, kwargs): every kernel switch takes both values somewhere.
CONFIGS = [
    ("Adam", {}),
    ("Adam", dict(levels=ALL_LEVELS, hypergrad_rule="multiplicative", weight_decay=0.1, maximize=True,
                  amsgrad=True)),
    ("AdamW", dict(levels=("layer", "param"), shrinkage={"param": 0.3}, rate_bounds=(0.0, 1.0))),
    ("AdamW", dict(levels=("global", "param"), shrinkage={"param": 0.3}, rate_bounds=None)),
    ("Adam", dict(levels=("param",), skip_nonfinite=False)),
    ("SGD", {}),
    ("SGD", dict(momentum=0.9, dampening=0.1, weight_decay=0.1, levels=ALL_LEVELS)),
    ("SGD", dict(momentum=0.9, nesterov=True, levels=ALL_LEVELS, hypergrad_rule="multiplicative",
                 rate_bounds=(None, 1.0))),
]
# Long rows (x % 4 == 0 and odd), short rows, 0-d, a transposed (strided) weight.
SHAPES = [(64, 300), (8, 257), (16, 3, 3, 3), (7,), (), (40, 3)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
              torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8"}


def capture_launches():
    """Step every configuration once (and once more for the steady state) per dtype;
    return the launches as (kernel, args, kwargs)."""
    import multilevel_hd as mlhd
    from multilevel_hd.backends import triton_backend, triton_tables

    calls = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            calls.append((kernel, args, kwargs))
        return run

    for kernel in (triton_tables.reduce.reduce_kernel, triton_tables.reduce.finish_kernel,
                   triton_tables.step.step_kernel, triton_backend.level_kernels.level_sums_kernel,
                   triton_backend.level_kernels.level_update_kernel):
        kernel.run = recorder(kernel)
    triton_backend.unavailable_reason = lambda device: None  # captured, never launched
    for dtype in DTYPES:
        for name, kwargs in CONFIGS:
            params = [torch.randn(s).to(dtype) for s in SHAPES]
            params[-1] = params[-1].t().contiguous().t()  # strides (1, 40)
            params = [p.requires_grad_() for p in params]
            opt = getattr(mlhd, f"MultiLevel{name}")(params, backend="triton", **kwargs)
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
    return calls


def signature(kernel, args, kwargs):
    values = dict(zip(kernel.arg_names, args), **kwargs)
    types, constants = {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = values[name]
        if i in kernel.constexprs:
            types[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            types[name] = "*" + TYPE_NAMES[value.dtype]
        elif isinstance(value, int):
            types[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            types[name] = "fp32"
    return types, constants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default: 90, H100/H200)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the interpreter compiles nothing")
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    seen, failures = set(), 0
    for kernel, call_args, kwargs in capture_launches():
        kwargs = dict(kwargs)
        num_warps = kwargs.pop("num_warps", 4)
        types, constants = signature(kernel, call_args, kwargs)
        key = (kernel.__name__, tuple(types.items()), tuple(map(str, constants.items())), num_warps)
        if key in seen:
            continue
        seen.add(key)
        switches = ", ".join(f"{k}={v}" for k, v in constants.items())
        start = time.perf_counter()
        try:
            compiled = triton.compile(triton.compiler.ASTSource(kernel, types, constants), target=target,
                                      options={"num_warps": num_warps})
        except Exception as err:  # report every failing variant, not only the first
            failures += 1
            print(f"FAILED {kernel.__name__} [{switches}]: {type(err).__name__}: {err}", flush=True)
            continue
        ptx = compiled.asm["ptx"]
        v4 = len(re.findall(r"ld\.global\S*\.v4\.", ptx))
        scalar = len(re.findall(r"ld\.global(?:\.(?!v\d)[\w:]+)*\.[bfu](?:16|32)\s", ptx))
        print(f"ok {kernel.__name__} {time.perf_counter() - start:.1f}s: {v4} v4 / {scalar} scalar loads "
              f"[{switches}]", flush=True)
    print(f"{len(seen)} variants compiled for sm_{args.arch}, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
