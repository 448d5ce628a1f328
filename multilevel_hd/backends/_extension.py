"""Loads the compiled ops (torch.ops.multilevel_hd.reduce / levels / apply), once per process,
and, when MLHD_CUDA_ON_CPU=1 is set before import, the CUDA kernels emulated on the CPU
(torch.ops.multilevel_hd_cuda_on_cpu: the same ops for CPU tensors; csrc/cuda_on_cpu).

An installed build (`MLHD_BUILD_EXT=1 pip install -e . --no-build-isolation` makes
multilevel_hd._C) is used when present; otherwise the sources in csrc/ are compiled with
torch.utils.cpp_extension (ninja) into a cache directory named after the sources' contents
(`_build_dir`), so only the first process pays for the compilation, and an edit of any
source builds afresh. Where neither works, `load_error()` says why and the backends that
need the ops report themselves unavailable ("auto" then picks the torch backend).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import warnings

import torch

from . import _csrc

NAME = "multilevel_hd_C"
EMULATION_NAME = "multilevel_hd_cuda_on_cpu"
# Read once, like TRITON_INTERPRET: whether backend "cuda" runs CPU tensors through the
# emulated CUDA kernels (a testing mode: much slower than "cpp").
CUDA_ON_CPU = os.environ.get("MLHD_CUDA_ON_CPU", "0") == "1"
# MLHD_CUDA_ON_CPU_SANITIZE=address builds the emulated kernels with AddressSanitizer (the
# CPU's stand-in for compute-sanitizer's memcheck); the process must then preload libasan
# (tests/test_cuda_on_cpu.py shows how).
SANITIZE = os.environ.get("MLHD_CUDA_ON_CPU_SANITIZE", "")
BUILD_HINT = "or build it ahead of time: MLHD_BUILD_EXT=1 pip install -e . --no-build-isolation"


@functools.cache
def load_error() -> str | None:
    """None once the ops are registered; else the reason, also warned about once."""
    try:
        _load()
    except Exception as err:  # a missing compiler or a failed build must not break import
        reason = f"the C++ extension could not be loaded: {_first_line(err)}"
        warnings.warn(f"multilevel_hd: {reason}; backend 'auto' falls back to 'torch'", RuntimeWarning, stacklevel=2)
        return reason
    _register_fakes()
    return None


@functools.cache
def emulation_error() -> str | None:
    """None once the CUDA-on-CPU ops are registered; else why backend "cuda" cannot run on CPU."""
    if not CUDA_ON_CPU:
        return "set MLHD_CUDA_ON_CPU=1 before importing multilevel_hd to run the CUDA kernels on CPU tensors"
    try:
        sanitize = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"] if SANITIZE else []
        _build(EMULATION_NAME, _csrc.emulation_sources(), [*_csrc.CXX_FLAGS, *_csrc.EMULATION_FLAGS, *sanitize],
               "cuda_on_cpu", sanitize)
    except Exception as err:
        return f"the CUDA-on-CPU emulation could not be built: {_first_line(err)}"
    return None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def has_cuda_kernels() -> bool:
    return load_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key("multilevel_hd::reduce", "CUDA")


def _load() -> None:
    if importlib.util.find_spec("multilevel_hd._C") is not None:
        importlib.import_module("multilevel_hd._C")
        return
    from torch.utils import cpp_extension

    with_cuda = cpp_extension.CUDA_HOME is not None
    _build(NAME, _csrc.sources(with_cuda), list(_csrc.CXX_FLAGS), "cuda" if with_cuda else "cpu")


def _build(name: str, sources: list[str], cflags: list[str], flavour: str, ldflags: list[str] = ()) -> None:
    """Compiles (or finds in the cache) one library of csrc/ and loads it, registering its ops."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH; install g++ or set CXX), {BUILD_HINT}")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError(f"ninja is missing (pip install ninja), {BUILD_HINT}")
    if not os.path.isdir(_csrc.CSRC):
        raise RuntimeError(f"the C++ sources are not installed ({_csrc.CSRC} is missing); {BUILD_HINT}")
    build_dir = _build_dir(flavour, cflags)  # (cflags include any sanitizer, so its build has its own)
    os.makedirs(build_dir, exist_ok=True)
    if _stale(os.path.join(build_dir, name + ".so")):
        print(f"multilevel_hd: compiling {name} into {build_dir} (first use only, 1-2 minutes)",
              file=sys.stderr, flush=True)
    cpp_extension.load(
        # copies: load() appends to the flag lists it is given, and _build_dir hashes them
        name=name, sources=sources, extra_cflags=list(cflags),
        extra_cuda_cflags=list(_csrc.NVCC_FLAGS), extra_ldflags=[*_csrc.LD_FLAGS, *ldflags], build_directory=build_dir,
        with_cuda=flavour == "cuda",
        is_python_module=False,
    )


def _build_dir(flavour: str, cflags: list[str]) -> str:
    """One directory per torch version, Python version, flavour and source contents, kept
    across processes. The contents hash (every file under csrc/, and the flags) means a
    library built from other sources (an older checkout, another working tree sharing the
    cache) is never picked up, whatever the files' modification times say."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "multilevel_hd")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{flavour}"
    return os.path.join(base, f"{tag}-{_sources_hash(flavour, cflags)}".replace("+", "_"))


def _sources_hash(flavour: str, cflags: list[str]) -> str:
    """A short digest of the C++/CUDA sources (headers included), where they are and the build
    flags. (Where: ninja's build file names the sources by path, so two checkouts of the same
    sources sharing one folder would rebuild it for each other at every load.)"""
    digest = hashlib.sha256(repr((cflags, _csrc.NVCC_FLAGS, _csrc.LD_FLAGS, flavour, _csrc.CSRC)).encode())
    for path in sorted(glob.glob(os.path.join(_csrc.CSRC, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, _csrc.CSRC).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def _stale(library: str) -> bool:
    if not os.path.exists(library):
        return True
    built = os.path.getmtime(library)
    return any(os.path.getmtime(f) > built for f in glob.glob(os.path.join(_csrc.CSRC, "**", "*"), recursive=True))


def _register_fakes() -> None:
    """The ops only mutate their arguments, so their fake (meta) versions do nothing; this is
    what lets torch.compile trace through a step."""
    for op in ("reduce", "levels", "apply"):
        torch.library.register_fake(f"multilevel_hd::{op}")(_no_output)


def _no_output(*args, **kwargs) -> None:
    return None
