"""rate_summary and log_rates (multilevel_hd/diagnostics.py) agree with opt.rates()."""
import pytest
import torch

import multilevel_hd as mlhd

from trajectory import DEFAULT_SHAPES, SMALL_SHAPES, GradFn, make_params

NEVER_STEPS = 1  # a float32 parameter without a gradient at any step: it keeps its initial rates


def make_opt():
    """Two groups: float32 with every level, float64 with levels in another order."""
    params = make_params(torch.float32, shapes=DEFAULT_SHAPES) + make_params(torch.float64, seed=1, shapes=SMALL_SHAPES)
    split = len(DEFAULT_SHAPES)
    return mlhd.MultiLevelAdam(
        [dict(params=params[:split], levels=("global", "layer", "unit", "param")),
         dict(params=params[split:], levels=("param", "global"), lr=3e-3)],
        hypergrad_rule="additive", hypergrad_lr=1e-4, combination_lr=30.0,
    )


def step(opt, steps, start=0):
    gradfn = GradFn(DEFAULT_SHAPES + SMALL_SHAPES, none={(s, NEVER_STEPS) for s in range(start, start + steps)})
    params = [p for g in opt.param_groups for p in g["params"]]
    for s in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = gradfn.grad(s, i, p)
        opt.step()


def expected_summary(opt) -> dict:
    """The summary written from opt.rates()."""
    out = {}
    for index, (group, rates) in enumerate(zip(opt.param_groups, opt.rates())):
        for level, w in zip(group["levels"], rates["weights"].tolist()):
            out[f"group{index}/weight/{level}"] = w
        for level in group["levels"]:
            if level == "global":
                out[f"group{index}/rate/global"] = rates["global"].item()
                continue
            flat = torch.cat([r.reshape(-1).double() for r in rates[level]])
            stats = dict(mean=flat.mean().item(), min=flat.min().item(), max=flat.max().item())
            out.update({f"group{index}/rate/{level}/{k}": v for k, v in stats.items()})
    return out


def assert_summary_matches(summary, expected):
    assert list(summary) == list(expected)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-12, abs=0), key


def test_summary_agrees_with_rates_after_steps():
    opt = make_opt()
    step(opt, 6)
    summary = mlhd.rate_summary(opt)
    assert_summary_matches(summary, expected_summary(opt))
    # The rates moved and spread out, so a wrong reduction cannot pass by accident.
    for level in ("layer", "unit", "param"):
        assert summary[f"group0/rate/{level}/min"] < summary[f"group0/rate/{level}/max"], level
    assert summary["group1/rate/param/max"] > 1.01 * 3e-3
    assert summary["group0/weight/unit"] != 0.25
    # Here every stepping rate grew: the minimum is the initial rate of the parameter that never stepped.
    assert summary["group0/rate/param/min"] == torch.tensor(1e-3).item()


def test_summary_before_the_first_step_holds_the_initial_values():
    opt = make_opt()
    summary = mlhd.rate_summary(opt)
    assert_summary_matches(summary, expected_summary(opt))
    assert summary["group0/weight/layer"] == 0.25 and summary["group1/weight/param"] == 0.5
    assert summary["group1/rate/param/max"] == 3e-3  # float64 group: exact
    assert not opt.state and opt.group_states == [None, None]  # reading creates no state


def test_summary_reads_the_device_once(monkeypatch):
    opt = make_opt()
    step(opt, 3)
    calls = {"tolist": 0, "item": 0}
    for name in calls:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    mlhd.rate_summary(opt)
    assert calls == {"tolist": 1, "item": 0}


def test_log_rates_fires_every_n_steps_until_removed():
    opt = make_opt()
    logged, expected = [], []
    handle = mlhd.log_rates(opt, 3, lambda n, summary: logged.append((n, summary)))
    for s in range(10):
        step(opt, 1, start=s)
        if (s + 1) % 3 == 0:
            expected.append((s + 1, mlhd.rate_summary(opt)))
    assert logged == expected and [n for n, _ in logged] == [3, 6, 9]
    handle.remove()
    step(opt, 3, start=10)
    assert len(logged) == 3


@pytest.mark.parametrize("every", [0, -2, 1.5, True, None])
def test_log_rates_rejects_a_bad_interval(every):
    with pytest.raises(ValueError, match="every"):
        mlhd.log_rates(make_opt(), every, print)
