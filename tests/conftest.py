"""pytest configuration for the multilevel_hd suite.

Backends
--------
``FAST_BACKENDS`` = ``available_backends(DEVICE)`` minus ``"reference"``: every test that takes
a ``backend`` parameter runs once per entry, so a new backend is covered automatically.

Environment knobs
-----------------
``MLHD_TEST_DEVICE``   device the fast backends run on (default ``cpu``); the reference
                       oracle always runs on the CPU in float64.
``MLHD_TEST_BACKENDS`` comma list restricting FAST_BACKENDS (e.g. ``triton``).
``MLHD_CUDA_ON_CPU``   on a CPU test device, defaults to ``1``: backend ``cuda`` then runs the
                       CUDA kernels of csrc/cuda emulated on the CPU (csrc/cuda_on_cpu), so
                       the whole suite covers them without a GPU. ``0`` leaves them out.
``MLHD_SLOW_BACKENDS`` comma list of backends that are slow (default ``triton``, e.g. the
                       Triton interpreter on CPU).  For those, tests marked ``heavy`` are
                       skipped and ``small_shapes`` is used, unless ``MLHD_TEST_FULL=1``.

Markers
-------
``heavy``          a large parametrisation; skipped for slow backends (see above).
``slow_backend``   added automatically to every test item whose backend is slow, so
                   ``-m "not slow_backend"`` deselects them all.
"""
from __future__ import annotations

import os
_ON_CPU = not os.environ.get("MLHD_TEST_DEVICE", "cpu").startswith("cuda")
# both before multilevel_hd is imported: they choose how the GPU backends run on CPU tensors
os.environ.setdefault("TRITON_INTERPRET", "1" if _ON_CPU else "0")
os.environ.setdefault("MLHD_CUDA_ON_CPU", "1" if _ON_CPU else "0")

import pytest
import torch

from multilevel_hd.backends import available_backends

from trajectory import DEFAULT_SHAPES, SMALL_SHAPES

torch.set_num_threads(min(2, torch.get_num_threads()))

DEVICE = torch.device(os.environ.get("MLHD_TEST_DEVICE", "cpu"))
ALL_BACKENDS = list(available_backends(DEVICE))
FAST_BACKENDS = [b for b in ALL_BACKENDS if b != "reference"]
if os.environ.get("MLHD_TEST_BACKENDS"):
    _want = [b.strip() for b in os.environ["MLHD_TEST_BACKENDS"].split(",") if b.strip()]
    FAST_BACKENDS = [b for b in FAST_BACKENDS if b in _want]
SLOW_BACKENDS = {b.strip() for b in os.environ.get("MLHD_SLOW_BACKENDS", "triton").split(",")
                 if b.strip()}
FULL = os.environ.get("MLHD_TEST_FULL", "") == "1"


def is_slow(backend: str) -> bool:
    return backend in SLOW_BACKENDS and not FULL


def shapes_for(backend: str):
    return SMALL_SHAPES if is_slow(backend) else DEFAULT_SHAPES


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: large parametrisation, skipped for slow backends")
    config.addinivalue_line("markers", "slow_backend: the test runs a slow backend")


def _item_backends(item):
    cs = getattr(item, "callspec", None)
    if cs is None:
        return []
    out = []
    for name in ("backend", "backend_a", "backend_b"):
        if name in cs.params:
            out.append(cs.params[name])
    return out


def pytest_collection_modifyitems(config, items):
    for item in items:
        bks = _item_backends(item)
        if any(b in SLOW_BACKENDS for b in bks):
            item.add_marker(pytest.mark.slow_backend)
            if not FULL and item.get_closest_marker("heavy") is not None:
                item.add_marker(pytest.mark.skip(reason="heavy case skipped for a slow backend "
                                                        "(set MLHD_TEST_FULL=1 to run it)"))


@pytest.fixture
def device():
    return DEVICE
