"""How the C++ extension is built (multilevel_hd/backends/_csrc.py, _extension.py), beyond the
cpp tests that use it:

* whether the CUDA kernels are compiled, over torch with and without CUDA, a GPU visible or
  not, TORCH_CUDA_ARCH_LIST set or not, nvcc found or not (and of torch's major CUDA version
  or not): the real decision, fed by the real gathering of its inputs with each injected;
* the CUDA build's link folder points at the CUDA runtime the process has loaded;
* a failed build: the fallback warning and backend="cpp"'s error quote the compiler's last
  lines and name the whole log.

About 5 s in all (one subprocess compiling a one-line file that fails).
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

from multilevel_hd.backends import _csrc

NVCC_SCRIPT = "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\necho 'Cuda compilation tools, release {}, V{}.0'\n"


def decide(monkeypatch, tmp_path, torch_cuda, gpus, arch_list, nvcc_release):
    """_csrc.decide_cuda on what _csrc.cuda_inputs gathers, with torch.version.cuda, the GPU
    count, the environment and an nvcc (a script saying its release; None: no nvcc) injected."""
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    home = tmp_path / "cuda"
    if nvcc_release is not None:
        (home / "bin").mkdir(parents=True)
        nvcc = home / "bin" / "nvcc"
        nvcc.write_text(NVCC_SCRIPT.format(nvcc_release, nvcc_release))
        nvcc.chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home) if nvcc_release is not None else None)
    return _csrc.decide_cuda(**_csrc.cuda_inputs())


@pytest.mark.parametrize("torch_cuda,gpus,arch_list,nvcc_release",
                         list(itertools.product([None, "13.0"], [0, 1], [None, "9.0"], [None, "13.0"])))
def test_cuda_kernels_are_compiled_only_where_they_can_be(monkeypatch, tmp_path, torch_cuda, gpus, arch_list,
                                                          nvcc_release):
    with_cuda, why = decide(monkeypatch, tmp_path, torch_cuda, gpus, arch_list, nvcc_release)
    assert with_cuda == bool(torch_cuda and (gpus or arch_list) and nvcc_release), why
    if torch_cuda is None:
        assert "without CUDA" in why
    elif not gpus and not arch_list:  # torch's arch detection would fail: say how to ask anyway
        assert "no GPU is visible" in why and "TORCH_CUDA_ARCH_LIST=9.0" in why
    elif nvcc_release is None:
        assert "nvcc is not found" in why
    else:
        assert ("TORCH_CUDA_ARCH_LIST=9.0" if arch_list else "1 visible GPU") in why
        assert os.path.join(str(tmp_path), "cuda", "bin", "nvcc") in why


@pytest.mark.parametrize("nvcc_release,with_cuda", [("12.8", False), ("13.1", True)])
def test_nvcc_of_another_major_cuda_version_builds_the_cpu_ops(monkeypatch, tmp_path, nvcc_release, with_cuda):
    """torch refuses an nvcc of another major version (a minor one it only warns about)."""
    decided, why = decide(monkeypatch, tmp_path, "13.0", 1, None, nvcc_release)
    assert decided == with_cuda, why
    if not with_cuda:
        assert f"CUDA {nvcc_release}" in why and "torch was built with CUDA 13.0" in why and "CUDA_HOME" in why


def test_cuda_runtime_link_points_at_the_loaded_runtime(monkeypatch, tmp_path):
    runtimes = []
    for version in ("12", "13"):
        runtime = tmp_path / f"libcudart.so.{version}"
        runtime.write_bytes(b"")
        monkeypatch.setattr(_csrc, "_loaded_cuda_runtime", lambda runtime=runtime: str(runtime))
        folder = _csrc.cuda_runtime_dir(str(tmp_path / "build"))
        assert os.path.realpath(os.path.join(folder, "libcudart.so")) == str(runtime)
        runtimes.append(runtime)
    assert sorted(os.listdir(folder)) == ["libcudart.so"]  # re-pointed, nothing left beside it
    monkeypatch.setattr(_csrc, "_loaded_cuda_runtime", lambda: None)
    assert _csrc.cuda_runtime_dir(str(tmp_path / "other")) is None


FAILING_BUILD = """
import sys, warnings, torch, multilevel_hd as mlhd
from multilevel_hd.backends import _csrc
_csrc.CSRC = sys.argv[1]  # sources whose ops.cpp does not compile
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mlhd.MultiLevelAdam([p]).step()  # backend="auto"
print("WARNING:", *[str(w.message) for w in caught if "falls back to 'torch'" in str(w.message)])
try:
    mlhd.MultiLevelAdam([p], backend="cpp").step()
except RuntimeError as err:
    print("ERROR:", err)
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_failed_build_quotes_the_compiler_and_names_the_log(tmp_path):
    import importlib.util

    if importlib.util.find_spec("multilevel_hd._C") is not None:
        pytest.skip("multilevel_hd._C is installed: nothing is compiled")
    sources = tmp_path / "csrc"
    (sources / "cpu").mkdir(parents=True)
    for path in _csrc.sources(False, str(sources)):  # the CPU library's files, empty but the first
        open(path, "w").close()
    (sources / "ops.cpp").write_text("#error planted defect: the compiler stops here\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), MLHD_CUDA_ON_CPU="0")
    result = subprocess.run([sys.executable, "-c", FAILING_BUILD, str(sources)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "ERROR:" in result.stdout, result.stdout + result.stderr
    warning = result.stdout.split("WARNING:", 1)[1].split("ERROR:", 1)[0]
    error = result.stdout.split("ERROR:", 1)[1]
    logs = list((tmp_path / "cache").glob("*/build.log"))
    assert len(logs) == 1, result.stdout
    assert "planted defect" in logs[0].read_text()
    for message in (warning, error):
        assert "compiling multilevel_hd_C failed" in message and str(logs[0]) in message, message
        assert "#error planted defect: the compiler stops here" in message, message  # the compiler's line
        assert "FAILED:" in message and " -c " not in message, message  # not the command, nor ninja's lines
        assert "ninja: build stopped" not in message and "[2/4]" not in message, message


def test_failed_link_quotes_the_linker():
    """ninja's output for the link failure of issue 19 (torch's -L$CUDA_HOME/lib64 without
    libcudart): the message keeps the linker's lines, not the command or the progress."""
    from multilevel_hd.backends._extension import _compiler_lines

    output = ("Error building extension 'multilevel_hd_C': [1/2] nvcc -c step.cu -o step.cuda.o\n"
              "[2/2] c++ step.cuda.o -shared -L/usr/local/lib64 -lcudart -o multilevel_hd_C.so\n"
              "FAILED: multilevel_hd_C.so \n"
              "c++ step.cuda.o -shared -L/usr/local/lib64 -lcudart -o multilevel_hd_C.so\n"
              "/usr/bin/ld: cannot find -lcudart: No such file or directory\n"
              "collect2: error: ld returned 1 exit status\n"
              "ninja: build stopped: subcommand failed.\n")
    assert _compiler_lines(output) == ["FAILED: multilevel_hd_C.so ",
                                       "/usr/bin/ld: cannot find -lcudart: No such file or directory",
                                       "collect2: error: ld returned 1 exit status"]
