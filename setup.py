"""Installs the multilevel_hd package; the top-level kernels/ folder becomes
multilevel_hd.kernels, so nothing named plain `kernels` lands in site-packages.

This file must not import torch: pip builds in an isolated environment, where importing
torch would make pip fetch a multi-GB wheel.
"""
from setuptools import setup

setup(
    name="multilevel_hd",
    version="0.1.0",
    description="Multi-level hyper-gradient descent optimizers for PyTorch, with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["multilevel_hd", "multilevel_hd.backends", "multilevel_hd.kernels"],
    package_dir={"multilevel_hd.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",  # satisfied by 2.13 (CPU wheel here) and 2.11 (the GPU machine)
        "ninja",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        # python -m bench.train (the digits comparison); Prodigy and schedule-free AdamW
        # join it when installed.
        "examples": ["scikit-learn", "tqdm", "matplotlib", "prodigyopt", "schedulefree"],
    },
)
