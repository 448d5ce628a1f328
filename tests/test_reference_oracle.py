"""The ``reference`` backend against the suite's own, independent float64 transcription of
docs/algorithm.md sections 2-3 (``trajectory.Oracle``).

The reference backend is the oracle for every fast backend (test_backends.py), so this file
is what ties the whole implementation to the spec.  It also checks that each configuration
really exercises what it claims (rates and weights move, clamps bind, options change the
trajectory), so that no comparison in the suite is vacuous.
"""
import pytest
import torch

from cases import ALL_LEVELS, OPTION_CASES, SUBSET_CASES, C
from trajectory import (STEPS, TOL_F64, GradFn, Oracle,
                        assert_trajectories_close,
                        initial_rates, make_params, max_rel_change, opt_class, run_case,
                        run_case_oracle, run_optimizer, run_oracle)

MOVE_RATE = 0.01     # every active level's rates move by >= 1 % somewhere within STEPS
MOVE_WEIGHT = 1e-3   # weights move by >= 1e-3 (absolute) where the case says they must


def _check_moved(case, snaps):
    levels = tuple(case.kwargs.get("levels", ("global", "unit")))
    lr = case.kwargs["lr"]
    ps = make_params(torch.float64)
    init = initial_rates(levels, lr, ps)
    last = snaps[-1]["rates"]
    for lv in levels:
        m = max(max_rel_change(init, s["rates"], lv) for s in snaps)
        assert m > MOVE_RATE, f"{case.name}: level {lv} rates moved only {m:.2e}: test too weak"
    if case.weights_move and len(levels) > 1:
        w0 = snaps[0]["rates"][0]["weights"]  # after step 1 the weights are still the initial
        m = float((last[0]["weights"] - w0).abs().max())
        assert m > MOVE_WEIGHT, f"{case.name}: weights moved only {m:.2e}: test too weak"


@pytest.mark.parametrize("case", OPTION_CASES + SUBSET_CASES, ids=str)
def test_reference_matches_spec_oracle(case):
    ref = run_case(case, "reference", torch.float64)
    orc, _ = run_case_oracle(case)
    _check_moved(case, orc)
    assert_trajectories_close(ref, orc, TOL_F64, label=f"{case.name} reference vs oracle")


def _all_rates(snap):
    out = []
    for r in snap["rates"]:
        for k, v in r.items():
            if k != "weights":
                out += v if isinstance(v, list) else [v]
    return [x for x in out if x.numel()]


def test_option_cases_are_distinct():
    """Each option changes the oracle's trajectory (else its comparison proves nothing).
    Pairs that are equal by construction are listed."""
    same_by_design = {
        frozenset({"sgd-default", "sgd-maximize"}),       # maximize with a flipped gradient
        frozenset({"adam-default", "adam-maximize"}),
        frozenset({"adam-decoupled", "adamw-default"}),    # AdamW == Adam(decoupled)
    }
    finals = {}
    for case in OPTION_CASES:
        snaps, _ = run_case_oracle(case)
        finals[case.name] = snaps[-1]
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if frozenset({a, b}) in same_by_design:
                continue
            d = max(float((x - y).abs().max()) if x.numel() else 0.0
                    for x, y in zip(finals[a]["params"], finals[b]["params"]))
            assert d > 1e-6, f"cases {a} and {b} give the same trajectory"


def test_bounds_cases_bind():
    """The oracle's bound cases do what their names say: without bounds some rate goes
    negative; with the default bounds the clamp at 0 binds; (lo, hi) binds on both sides."""
    by = {c.name: c for c in OPTION_CASES}
    for name in ("sgd-bounds-none", "adam-bounds-none"):
        snaps, _ = run_case_oracle(by[name])
        assert min(float(r.min()) for s in snaps for r in _all_rates(s)) < 0, name
    for name in ("sgd-bounds-default", "adam-bounds-default"):
        snaps, _ = run_case_oracle(by[name])
        assert min(float(r.min()) for s in snaps for r in _all_rates(s)) == 0.0, name
    for name in ("sgd-bounds-lohi", "adam-bounds-lohi"):
        lo, hi = by[name].kwargs["rate_bounds"]
        snaps, _ = run_case_oracle(by[name])
        rs = [r for s in snaps for r in _all_rates(s)]
        assert max(float(r.max()) for r in rs) == hi, name
        if name.startswith("sgd"):
            assert min(float(r.min()) for r in rs) == lo, name


@pytest.mark.parametrize("case", [c for c in OPTION_CASES if c.kwargs.get("amsgrad")], ids=str)
def test_amsgrad_cases_bind(case):
    """In the amsgrad cases the running maximum binds (vmax > v somewhere), so their
    comparisons test it: amsgrad=False gives another trajectory."""
    on, _ = run_case_oracle(case)
    off, _ = run_case_oracle(case, extra=dict(amsgrad=False))
    d = max(float((a - b).abs().max()) for a, b in zip(on[-1]["params"], off[-1]["params"]) if a.numel())
    assert d > 1e-4, f"{case.name}: amsgrad changes the parameters by only {d:.1e}"


def test_shrinkage_on_global_is_a_no_op():
    """docs/algorithm.md section 2.4: a level without a parent is not shrunk (global never has one; nor does the
    coarsest active level)."""
    for cls, kw in (("SGD", dict(levels=("global", "unit"))), ("SGD", dict(levels=("unit",))),
                    ("Adam", dict(levels=("layer", "param"), init_weights=(1, 3)))):
        base = C("x", cls, **kw)
        coarsest = min(kw["levels"], key=ALL_LEVELS.index)
        shr = C("y", cls, shrinkage={coarsest: 0.5}, **kw)
        a = run_case(base, "reference")
        b = run_case(shr, "reference")
        assert_trajectories_close(a, b, TOL_F64, label=f"shrinkage on {coarsest}")


@pytest.mark.parametrize("cls", ["SGD", "Adam"])
def test_grad_none_and_two_groups_match_oracle(cls):
    """Parameters without a gradient at some steps (skipped entirely, not counted in N) in two
    param groups with different options, against the oracle."""
    ps = make_params(torch.float64)
    none = {(2, 2), (3, 2), (4, 2), (5, 3), (6, 0), (6, 1), (6, 4), (7, 5), (8, 3)}
    gf = GradFn(none=none)
    base = C("x", cls).kwargs
    g0 = dict(base, levels=("layer", "param"), init_weights=(1, 2))
    g1 = dict(base, levels=("global", "unit", "param"), lr=base["lr"] * 0.7,
              hypergrad_rule="multiplicative", hypergrad_lr=0.05, combination_lr=2.0,
              init_weights=(3, 2, 1))
    if cls == "SGD":
        g1.update(momentum=0.9, nesterov=True)
    else:
        g1.update(weight_decay=0.1, decoupled_weight_decay=True)
    groups = [dict(params=ps[:3], **g0), dict(params=ps[3:], **g1)]

    oracle = Oracle([dict(params=[p.detach().clone() for p in ps[:3]], **g0),
                     dict(params=[p.detach().clone() for p in ps[3:]], **g1)],
                     "sgd" if cls == "SGD" else "adam")
    opt = opt_class(cls)(groups, backend="reference")
    a = run_optimizer(opt, gf, STEPS)
    b = run_oracle(oracle, gf, STEPS)
    # effective_rate of a parameter without a gradient at the current step: see
    # test_invariants.py::test_effective_rate_of_param_without_grad (checked separately)
    assert_trajectories_close(a, b, TOL_F64, label=f"{cls} grad None, two groups",
                              eff_skip_at=lambda s: {i for (st, i) in none if st == s})
