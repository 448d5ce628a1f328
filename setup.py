"""Installs the multilevel_hd package; the top-level kernels/ folder becomes
multilevel_hd.kernels, so nothing named plain `kernels` lands in site-packages, and the
top-level csrc/ becomes package data in multilevel_hd/csrc, so that every install (wheel,
sdist, `pip install .` or `git+...`, not only an editable one) can compile the C++ extension
on first use.

This file must not import torch: pip builds in an isolated environment, where importing
torch would make pip fetch a multi-GB wheel. The one exception is the ahead-of-time build
of the compiled backend, `MLHD_BUILD_EXT=1 pip install -e . --no-build-isolation`, which
builds multilevel_hd._C against the torch already installed (without it, the extension is
compiled on first use).
"""
import importlib.util
import os

from setuptools import setup


# The C++/CUDA sources, as package data: every file of csrc/ and its folders.
CSRC_FILES = [os.path.relpath(os.path.join(folder, name), "csrc")
              for folder, _, names in os.walk("csrc") for name in names]


def compiled_extension() -> dict:
    """setup() arguments for multilevel_hd._C; its CUDA kernels where they can be built
    (the JIT build's decision, _csrc.decide_cuda)."""
    if os.environ.get("MLHD_BUILD_EXT") != "1":
        return {}
    from torch.utils import cpp_extension

    # the source list, flags and CUDA decision the JIT build uses, read without importing
    # the package
    spec = importlib.util.spec_from_file_location("_csrc", os.path.join("multilevel_hd", "backends", "_csrc.py"))
    csrc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(csrc)
    with_cuda, why = csrc.decide_cuda(**csrc.cuda_inputs())
    print(f"multilevel_hd._C: {why}")
    runtime = csrc.cuda_runtime_dir("build") if with_cuda else None
    extension = (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(
        "multilevel_hd._C", csrc.sources(with_cuda, root="csrc"),
        extra_compile_args={"cxx": csrc.CXX_FLAGS, "nvcc": csrc.NVCC_FLAGS}, extra_link_args=csrc.LD_FLAGS,
        library_dirs=[runtime] if runtime else [],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="multilevel_hd",
    version="0.1.0",
    description="Multi-level hyper-gradient descent optimizers for PyTorch, with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["multilevel_hd", "multilevel_hd.backends", "multilevel_hd.kernels", "multilevel_hd.csrc"],
    package_dir={"multilevel_hd.kernels": "kernels", "multilevel_hd.csrc": "csrc"},
    package_data={"multilevel_hd.csrc": CSRC_FILES},
    install_requires=[
        "torch>=2.4",  # satisfied by 2.13 (CPU wheel here) and 2.11 (the GPU machine)
        "ninja",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # expecttest: torch.testing._internal (PyTorch's own optimizer error inputs) imports it
        "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest"],
        # python -m bench.train (the digits comparison); Prodigy and schedule-free AdamW
        # join it when installed.
        "examples": ["scikit-learn", "tqdm", "matplotlib", "prodigyopt", "schedulefree"],
        # tests/test_integrations.py: the training libraries the optimizers drop into, pinned
        # (their releases change how they drive an optimizer: clipping, checkpoints, AMP)
        "integrations": ["lightning==2.6.6", "accelerate==1.15.0"],
    },
    **compiled_extension(),
)
