"""Installs that are not the editable one: a wheel and an sdist, each built from a clean copy
of the repository, installed into a fresh virtual environment and run from outside the
repository, where `backend="cpp"` must compile the C++ sources the package carries (package
data, multilevel_hd/csrc) and step like the float64 reference.

Marked `packaging` (`-m "not packaging"` leaves it out locally; CI runs it). About 40 s on 2
cores once the extension is in the cache: the venvs borrow this environment's torch through a
.pth file (nothing is downloaded or reinstalled), and the build cache is keyed by the
sources' contents, the flags and torch, not the install path, so both installs load the
library this suite's own cpp tests built (the first compiles it where the cache is cold, some
60 s more, and the second must not compile again).
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parents[1]
# what `git clean -fdX` would remove, and the history: the copy is what a fresh clone holds
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".benchmarks", "*.so", "gpu_check-*")

STEP_CPP = """
import os, sys, torch, multilevel_hd as mlhd
from multilevel_hd.backends import _csrc
site_packages = sys.argv[1]
assert mlhd.__file__.startswith(site_packages), mlhd.__file__
assert _csrc.CSRC == os.path.join(site_packages, "multilevel_hd", "csrc"), _csrc.CSRC
trajectories = []
for backend in ("cpp", "reference"):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for shape in ((5, 3), (4,))]
    opt = mlhd.MultiLevelAdam(params, lr=0.01, backend=backend)  # "cpp": a RuntimeError if it cannot run
    for _ in range(3):
        for p in params:
            p.grad = p.detach() * 0.5 + 0.1
        opt.step()
    trajectories.append(torch.cat([p.detach().flatten() for p in params]))
torch.testing.assert_close(trajectories[0], trajectories[1], rtol=1e-10, atol=1e-12)
print("stepped cpp from", _csrc.CSRC)
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}:\n{result.stdout}\n{result.stderr}"
    return result


def _venv(path: Path) -> tuple[Path, Path]:
    """A fresh venv seeing this environment's packages (torch, setuptools, ninja) after its own."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    own = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (own / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python, own


def test_wheel_and_sdist_installs_build_and_step_cpp(tmp_path):
    source = tmp_path / "clone"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    dist = tmp_path / "dist"
    build = "from setuptools import build_meta; build_meta.build_{}({!r})"
    _run([sys.executable, "-c", build.format("sdist", str(dist))], cwd=source)
    _run([sys.executable, "-c", build.format("wheel", str(dist))], cwd=source)
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLHD_CUDA_ON_CPU")}
    compiled = []
    for name, artefact in (("wheel", wheel), ("sdist", sdist)):
        python, site_packages = _venv(tmp_path / f"venv-{name}")
        _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
              "--no-build-isolation", "--no-index", str(artefact)], cwd=tmp_path, env=env)
        result = _run([str(python), "-c", STEP_CPP, str(site_packages)], cwd=tmp_path, env=env)
        assert "stepped cpp" in result.stdout, result.stdout + result.stderr
        compiled.append("compiling multilevel_hd_C" in result.stderr)
    assert not compiled[1], "the sdist's install compiled again the sources the wheel's install had built"
