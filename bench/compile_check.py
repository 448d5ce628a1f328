"""Compile the triton backend's kernels for a GPU on a machine without one.

    TRITON_INTERPRET=0 python -m bench.compile_check [--arch 90]

Steps optimizers of many configurations on CPU tensors with the kernel launches captured
instead of run, then compiles every captured (kernel, signature, switches) variant for
the CUDA target with Triton's own compiler and ptxas. The interpreter that runs the
test suite on the CPU accepts code that the compiler rejects (non-constexpr globals,
loop-carried types, ...), so this catches such errors before a GPU is spent on them. It
also counts in each variant's PTX (`PTX_COUNTS`) the 16-byte (v4) and 32-bit global
loads (the full chunks of the step kernel and the WIDE4 reduction tiles should use
16-byte loads), the 64-bit integer divisions, and the approximate float32 divisions and
square roots, which fail the check: on CUDA `/` and `tl.sqrt` compile to approximations
(`div.full.f32`, `sqrt.approx.ftz.f32`) that the interpreter, which computes IEEE results,
never shows; the kernels use `tl.div_rn` and `tl.sqrt_rn`, as torch.optim's fused Adam
and the cuda backend round.
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
# What main() counts in each variant's PTX (regular expressions).
PTX_COUNTS = {
    "v4 loads": r"ld\.global\S*\.v4\.",
    "scalar loads": r"ld\.global(?:\.(?!v\d)[\w:]+)*\.[bfu](?:16|32)\s",
    "64-bit div/rem": r"\b(?:div|rem)\.[su]64\s",
    "approximate div/sqrt": r"\b(?:div\.full|div\.approx|sqrt\.approx|rcp\.approx|rsqrt\.approx)(?:\.ftz)?\.f32\s",
}


def capture_launches(configs=CONFIGS, dtypes=DTYPES):
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
    for dtype in dtypes:
        for name, kwargs in configs:
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


def cuda_compiler_missing(arch: int):
    """None if Triton can compile for sm_`arch` here (its NVIDIA backend and ptxas), else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(arch).path  # raises if no ptxas is found
    except Exception as err:  # noqa: BLE001 (any failure means: cannot compile here)
        return f"Triton cannot compile for CUDA here: {type(err).__name__}: {err}"
    return None


def compile_variants(arch: int, kernels=None, configs=CONFIGS, dtypes=DTYPES):
    """Compile every distinct captured variant (of the named kernels, default all) for
    sm_`arch`; yield (kernel name, switches, seconds, PTX or the exception raised)."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for kernel, call_args, kwargs in capture_launches(configs, dtypes):
        if kernels is not None and kernel.__name__ not in kernels:
            continue
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
            result = compiled.asm["ptx"]
        except Exception as err:  # report every failing variant, not only the first
            result = err
        yield kernel.__name__, switches, time.perf_counter() - start, result


def ptx_counts(ptx: str) -> dict:
    return {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default: 90, H100/H200)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the interpreter compiles nothing")
    missing = cuda_compiler_missing(args.arch)
    if missing is not None:
        sys.exit(missing)
    variants = failures = 0
    for name, switches, seconds, result in compile_variants(args.arch):
        variants += 1
        if isinstance(result, Exception):
            failures += 1
            print(f"FAILED {name} [{switches}]: {type(result).__name__}: {result}", flush=True)
            continue
        counts = ptx_counts(result)
        approximate = counts["approximate div/sqrt"] > 0
        failures += approximate
        print(f"{'FAILED' if approximate else 'ok'} {name} {seconds:.1f}s: "
              f"{', '.join(f'{n} {what}' for what, n in counts.items())} [{switches}]", flush=True)
    print(f"{variants} variants compiled for sm_{args.arch}, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
