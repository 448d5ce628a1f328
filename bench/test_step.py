"""pytest-benchmark cases: one optimizer `step()` per candidate (bench.candidates) and model.

    pytest bench                                        the `tiny` set on CPU (seconds)
    MLHD_BENCH_MODELS=resnet18,resnet50 pytest bench    real networks
    MLHD_BENCH_DEVICE=cuda MLHD_BENCH_ROUNDS=200 pytest bench

Each case times its candidate alone; for ratios measured side by side on a shared machine use
`python -m bench.report`.
"""
import os

import pytest
import torch

from bench.candidates import ALL_CANDIDATES, Live
from bench.shapes import MODELS, make_grads, make_params

BENCH_MODELS = os.environ.get("MLHD_BENCH_MODELS", "tiny").split(",")
DEVICE = torch.device(os.environ.get("MLHD_BENCH_DEVICE", "cpu"))
ROUNDS = int(os.environ.get("MLHD_BENCH_ROUNDS", "30"))
WARMUP = 3  # the first step creates the state; the second is the first with hyper-gradients


@pytest.fixture(scope="module", params=BENCH_MODELS)
def model(request):
    """Shapes, parameters and two gradient sets, shared by all candidates of a model."""
    if request.param not in MODELS:
        pytest.fail(f"MLHD_BENCH_MODELS: unknown model {request.param!r}, not in {list(MODELS)}")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("MLHD_BENCH_DEVICE=cuda but torch sees no CUDA device")
    shapes = MODELS[request.param]
    grad_sets = [make_grads(shapes, DEVICE, seed=seed) for seed in (1, 2)]
    return request.param, shapes, make_params(shapes, DEVICE), grad_sets


@pytest.mark.parametrize("candidate", ALL_CANDIDATES, ids=lambda c: c.id)
def test_step(benchmark, model, candidate):
    name, shapes, params, grad_sets = model
    reason = candidate.unavailable_reason(shapes, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    live = Live(candidate, params, grad_sets)
    for _ in range(WARMUP):
        live.feed()
        live.step()

    def step():
        live.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)  # pytest-benchmark's clock is the host's

    benchmark.group = f"{name} on {DEVICE}"
    benchmark.extra_info["min_bytes"] = candidate.min_bytes(shapes, params[0].dtype)
    benchmark.pedantic(step, setup=live.feed, rounds=ROUNDS)
