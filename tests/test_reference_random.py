"""The reference backend and every fast backend against the suite's float64 oracle
(``trajectory.Oracle``) on randomised configurations drawn by hypothesis.

hypothesis is part of the ``test`` extra; where it is missing (a GPU machine's own Python
may lack it) this file is skipped and the rest of the suite still runs."""
import pytest
import torch

pytest.importorskip("hypothesis", reason="the randomised oracle test needs hypothesis: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cases import ALL_LEVELS  # noqa: E402
from conftest import DEVICE, FAST_BACKENDS, is_slow  # noqa: E402
from trajectory import (CLASS_KIND, TOL_F64, GradFn, Oracle, assert_trajectories_close,  # noqa: E402
                        make_params, opt_class, run_optimizer, run_oracle)


# ------------------------------------------------------------------------------------------
# randomised: shapes (incl. (k, 0) tensors: k unit rates that never move), level subsets
# and options, reference and every fast backend against the oracle
# ------------------------------------------------------------------------------------------
@st.composite
def _configs(draw):
    n = draw(st.integers(1, 4))
    shapes = []
    for _ in range(n):
        dims = draw(st.lists(st.integers(0, 4), min_size=0, max_size=4))
        if dims and 0 in dims and draw(st.booleans()):
            dims = [d if d else 1 for d in dims]  # mostly non-empty
        cl = (len(dims) == 4 and draw(st.booleans())) or \
            ("t" if len(dims) == 2 and draw(st.booleans()) else False)
        shapes.append((tuple(dims), cl))
    levels = tuple(draw(st.permutations(ALL_LEVELS))[: draw(st.integers(1, 4))])
    cls = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    rule = draw(st.sampled_from(["additive", "multiplicative"]))
    kw = dict(levels=levels, hypergrad_rule=rule,
              hypergrad_scaling=draw(st.sampled_from(["size", "none"])),
              init_weights=tuple(draw(st.lists(st.integers(1, 5), min_size=len(levels),
                                               max_size=len(levels)))))
    if cls == "SGD":
        kw["lr"] = 0.05
        kw["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
    else:
        kw["lr"] = 0.01
    if rule == "additive":
        kw["hypergrad_lr"] = (1e-4 if cls == "SGD" else 3e-5) * draw(st.sampled_from([0.1, 1.0]))
    else:
        kw["hypergrad_lr"] = draw(st.sampled_from([0.02, 0.1]))
        kw["combination_lr"] = draw(st.sampled_from([0.1, 2.0]))
    fine = [lv for lv in levels if lv != "global"]
    if fine and draw(st.booleans()):
        kw["shrinkage"] = {draw(st.sampled_from(fine)): 0.3}
    kw["rate_bounds"] = draw(st.sampled_from([(0.0, None), None, (0.5 * kw["lr"], 1.5 * kw["lr"])]))
    if draw(st.booleans()):
        kw["hd_decay"] = 0.1
    if draw(st.booleans()):
        kw["maximize"] = True
    seed = draw(st.integers(0, 3))
    none = draw(st.sets(st.tuples(st.integers(1, 5), st.integers(0, n - 1)), max_size=3))
    return tuple(shapes), cls, kw, seed, none


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
          database=None, derandomize=True)
@given(_configs())
def test_random_configurations_match_oracle(cfg):
    shapes, cls, kw, seed, none = cfg
    steps = 6
    gf = GradFn(shapes, seed, sign=-1.0 if kw.get("maximize") else 1.0, none=none)
    orc = Oracle([dict(params=make_params(torch.float64, "cpu", seed, shapes), **kw)],
                 CLASS_KIND[cls])
    expected = run_oracle(orc, gf, steps)
    for backend in ["reference"] + [b for b in FAST_BACKENDS if not is_slow(b)]:
        ps = make_params(torch.float64, "cpu" if backend == "reference" else DEVICE, seed, shapes)
        opt = opt_class(cls)(ps, backend=backend, **kw)
        got = run_optimizer(opt, gf, steps)
        assert_trajectories_close(got, expected, TOL_F64, label=f"{backend} {cfg}",
                                  eff_skip_at=lambda s: {i for (st_, i) in none if st_ == s})
