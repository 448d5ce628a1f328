"""Loads the compiled ops (torch.ops.multilevel_hd.reduce / levels / apply), once per process,
and, when MLHD_CUDA_ON_CPU=1 is set before import, the CUDA kernels emulated on the CPU
(torch.ops.multilevel_hd_cuda_on_cpu: the same ops for CPU tensors; csrc/cuda_on_cpu).

An installed build (`MLHD_BUILD_EXT=1 pip install -e . --no-build-isolation` makes
multilevel_hd._C) is used when present; otherwise the sources (csrc/, installed with the
package) are copied into a cache directory named after their contents and the build's
flags (`_build_dir`) and compiled there with torch.utils.cpp_extension (ninja), so only the
first process pays for the compilation, every install of the same sources shares it, and an
edit of any source builds afresh. The CUDA kernels are compiled only where they can be
(`_csrc.decide_cuda`); otherwise the library has the CPU ops. Where nothing works,
`load_error()` says why (a failed build: the compiler's last lines and the whole log's path)
and the backends that need the ops report themselves unavailable ("auto" then picks the
torch backend).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
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
        reason = f"the C++ extension could not be loaded: {_describe(err)}"
        warnings.warn(f"multilevel_hd: backend 'auto' falls back to 'torch': {reason}", RuntimeWarning, stacklevel=2)
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
        _build(EMULATION_NAME, _csrc.emulation_sources, [*_csrc.CXX_FLAGS, *_csrc.EMULATION_FLAGS, *sanitize],
               "cuda_on_cpu", sanitize)
    except Exception as err:
        return f"the CUDA-on-CPU emulation could not be built: {_describe(err)}"
    return None


@functools.cache
def cuda_decision() -> tuple[bool, str]:
    """Whether the JIT-built library gets the CUDA kernels, and why (_csrc.decide_cuda)."""
    return _csrc.decide_cuda(**_csrc.cuda_inputs())


class BuildError(RuntimeError):
    """A compilation that failed; its message is the compiler's last lines and the log's path."""


def _describe(err: Exception) -> str:
    """The reason a load failed: a BuildError whole (it is kept short), else the first line."""
    text = str(err).strip()
    if isinstance(err, BuildError) or not text:
        return text or type(err).__name__
    return text.splitlines()[0]


def has_cuda_kernels() -> bool:
    return load_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key("multilevel_hd::reduce", "CUDA")


def _installed_build() -> bool:
    return importlib.util.find_spec("multilevel_hd._C") is not None


def without_cuda_kernels_reason() -> str:
    """Why the loaded library has no CUDA kernels."""
    if _installed_build():
        return ("the installed multilevel_hd._C was built without them (where torch had no CUDA, nvcc was not "
                "found, or neither a GPU was visible nor TORCH_CUDA_ARCH_LIST set)")
    return cuda_decision()[1]


def _load() -> None:
    if _installed_build():
        importlib.import_module("multilevel_hd._C")
        return
    with_cuda, why = cuda_decision()
    _build(NAME, lambda root: _csrc.sources(with_cuda, root), list(_csrc.CXX_FLAGS),
           "cuda" if with_cuda else "cpu", note=why)


def _build(name: str, sources, cflags: list[str], flavour: str, ldflags: list[str] = (), note: str = "") -> None:
    """Compiles (or finds in the cache) one library of csrc/ and loads it, registering its ops.
    `sources(root)` lists its files under a copy of csrc/ at `root`; `note` says what the
    flavour holds, in the line printed while compiling."""
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
    root = _copy_sources(build_dir)
    if flavour == "cuda":
        runtime = _csrc.cuda_runtime_dir(build_dir)
        ldflags = [*ldflags, f"-L{runtime}"] if runtime else ldflags
    if not os.path.exists(os.path.join(build_dir, name + ".so")):
        print(f"multilevel_hd: compiling {name} into {build_dir} (first use only, 1-2 minutes)"
              + (f"; {note}" if note else ""), file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            # copies: load() appends to the flag lists it is given, and _build_dir hashes them
            name=name, sources=sources(root), extra_cflags=list(cflags),
            extra_cuda_cflags=list(_csrc.NVCC_FLAGS), extra_ldflags=[*_csrc.LD_FLAGS, *ldflags],
            build_directory=build_dir, with_cuda=flavour == "cuda", is_python_module=False,
        )
    except RuntimeError as err:
        if not str(err).startswith("Error building extension"):
            raise
        raise _build_error(name, build_dir, str(err)) from err


LOG_TAIL = 12  # lines of a failed build's compiler output that its error message quotes
_NINJA_LINE = re.compile(r"(Error building extension '[^']*': )?\[\d+/\d+\] |ninja: ")


def _build_error(name: str, build_dir: str, output: str) -> BuildError:
    """Keeps a failed build's whole output in build.log; the error quotes the last lines of
    what the compiler or linker said (`_compiler_lines`)."""
    log = os.path.join(build_dir, "build.log")
    with open(log, "w", encoding="utf-8") as f:
        f.write(output)
    tail = "\n".join("    " + line for line in _compiler_lines(output)[-LOG_TAIL:])
    return BuildError(f"compiling {name} failed (whole output: {log}); the compiler's last lines:\n{tail}")


def _compiler_lines(output: str) -> list[str]:
    """ninja's output without its own lines: for each step that failed, its `FAILED:` line and
    what the compiler said, not the command (a screenful of flags) nor the other steps'
    progress lines; everything but ninja's lines where no step is marked failed."""
    kept, failed, command = [], False, False
    for line in output.splitlines():
        if line.startswith("FAILED:"):
            kept.append(line)
            failed = command = True
        elif _NINJA_LINE.match(line):
            failed = False
        elif failed and command:
            command = False
        elif failed and line.strip():
            kept.append(line)
    return kept or [line for line in output.splitlines() if line.strip() and not _NINJA_LINE.match(line)]


def _copy_sources(build_dir: str) -> str:
    """csrc/ copied into the build directory, which its contents name: ninja then compiles
    files at the same paths whichever install (or checkout) of those sources loads them, so
    they all share one build. Copied once, under a temporary name then renamed, so that a
    process building at the same time never sees half a copy."""
    root = os.path.join(build_dir, "csrc")
    if not os.path.isdir(root):
        partial = tempfile.mkdtemp(prefix="csrc-", dir=build_dir)
        shutil.copytree(_csrc.CSRC, partial, dirs_exist_ok=True)
        try:
            os.rename(partial, root)
        except OSError:  # another process renamed its copy first: the same files
            shutil.rmtree(partial, ignore_errors=True)
    return root


def _build_dir(flavour: str, cflags: list[str]) -> str:
    """One directory per torch version, Python version, flavour and source contents, kept
    across processes. The contents hash (every file under csrc/, and the flags) means a
    library built from other sources (an older checkout, another working tree sharing the
    cache) is never picked up, whatever the files' modification times say; the same sources
    from any install share it."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "multilevel_hd")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{flavour}"
    return os.path.join(base, f"{tag}-{_sources_hash(flavour, cflags)}".replace("+", "_"))


def _sources_hash(flavour: str, cflags: list[str]) -> str:
    """A short digest of the C++/CUDA sources (headers included), the build flags and the
    torch they build against. Not where the sources are: ninja compiles the copy in the build
    directory. (torch's place is in: ninja's build file names its headers by path, so two
    torch installs sharing one folder would rebuild it for each other at every load. For the
    CUDA kernels, the architectures asked for.)"""
    cuda = (os.environ.get("TORCH_CUDA_ARCH_LIST", ""), torch.version.cuda) if flavour == "cuda" else ()
    digest = hashlib.sha256(repr((cflags, _csrc.NVCC_FLAGS, _csrc.LD_FLAGS, flavour, cuda,
                                  os.path.dirname(torch.__file__))).encode())
    for path in sorted(glob.glob(os.path.join(_csrc.CSRC, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, _csrc.CSRC).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def _register_fakes() -> None:
    """The ops only mutate their arguments, so their fake (meta) versions do nothing; this is
    what lets torch.compile trace through a step."""
    for op in ("reduce", "levels", "apply"):
        torch.library.register_fake(f"multilevel_hd::{op}")(_no_output)


def _no_output(*args, **kwargs) -> None:
    return None
