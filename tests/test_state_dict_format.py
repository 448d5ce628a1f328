"""Format compatibility: state dicts saved by earlier versions load into this one and continue
their runs (docs/algorithm.md section 4, issue 19). tests/fixtures/state_dicts_v0.1.0.pt was saved by 0.1.0
(tests/fixtures/make_state_dicts.py says how, for three configurations); every backend loads
it under torch.load(weights_only=True), gives back the saved rates and takes the next steps
as 0.1.0 did. Never regenerate a fixture: it stands for checkpoints users already have.
(~1 s on 2 cores.)"""
from pathlib import Path

import pytest
import torch

import multilevel_hd as mlhd
from conftest import FAST_BACKENDS

FIXTURES = Path(__file__).parent / "fixtures"
BACKENDS = [b for b in FAST_BACKENDS if b != "triton"] + ["reference"]  # triton: ~50 ms a step interpreted


def _fixture_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_state_dicts", FIXTURES / "make_state_dicts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _fixture_module()  # the configurations and the problem the fixture was recorded on


@pytest.mark.parametrize("version", ["v0.1.0"])
@pytest.mark.parametrize("name", list(MAKE.CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_state_dict_loads_and_continues(backend, name, version):
    entry = torch.load(FIXTURES / f"state_dicts_{version}.pt", weights_only=True)[name]
    cls, options = MAKE.CONFIGS[name]
    params, closure = MAKE.problem()
    with torch.no_grad():
        for p, saved in zip(params, entry["params"]):
            p.copy_(saved)
    opt = getattr(mlhd, cls)(params, backend=backend, **options)
    opt.load_state_dict(entry["state_dict"])
    assert opt.backends() == [backend]
    for level, saved in entry["rates"][0].items():
        got = opt.rates()[0][level]
        torch.testing.assert_close(got, saved, rtol=0, atol=0, msg=lambda m: f"{level}: {m}")
    for _ in range(MAKE.THEN):
        opt.step(lambda: closure(opt))
    moved = max(float((a - b).abs().max()) for a, b in zip(entry["params_after"], entry["params"]))
    assert moved > 1e-3  # the steps after loading are not a no-op, so the comparison can fail
    torch.testing.assert_close(params, entry["params_after"], rtol=1e-5, atol=1e-6)
