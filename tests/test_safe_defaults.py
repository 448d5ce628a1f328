"""Safety of the defaults (docs/algorithm.md sections 4-5; README, "The defaults"): nothing non-finite from
the optimizer's own arithmetic at any lr and dtype, lr=0 freezes a group under every rule, and
with every multi-level option at its default an LR schedule does not speed up the learning of
rates and weights.

Cost: about 40 s on 2 cores, most of it the Triton interpreter (tiny tensors, few steps).
"""
from __future__ import annotations

import pytest
import torch

import multilevel_hd as mlhd
from conftest import FAST_BACKENDS
from schedule_study import run
from trajectory import GradFn, make_params

LRS = (0.0, 1e-28, 1e-12, 1e-6, 1e-3, 0.1, 1.0)  # 1e-28: PyTorch's own tests freeze a group with it
SHAPES = [((3, 2), False), ((3,), False)]
STEPS = 4
CLASSES = {"adamw": (mlhd.MultiLevelAdamW, torch.optim.AdamW, {}),
           "sgd": (mlhd.MultiLevelSGD, torch.optim.SGD, dict(momentum=0.9, nesterov=True))}
# the defaults, and the paper's additive rule with its derived combination_lr (beta / lr**2)
RULES = {"defaults": {}, "paper-additive": dict(hypergrad_rule="additive")}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _groups(dtype, lrs=LRS):
    """One param group per lr, each its own tiny tensors."""
    return [dict(params=make_params(dtype=dtype, seed=i, shapes=SHAPES), lr=lr) for i, lr in enumerate(lrs)]


def _run(opt, steps=STEPS, scheduler=None):
    gradfn = GradFn(SHAPES * (sum(len(g["params"]) for g in opt.param_groups) // len(SHAPES)))
    params = [p for g in opt.param_groups for p in g["params"]]
    for s in range(steps):
        for i, p in enumerate(params):
            p.grad = gradfn.grad(s, i, p)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _finite(opt) -> bool:
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for entry in opt.rates():
        tensors += [entry["weights"]] + [x for lv, v in entry.items() if lv != "weights"
                                         for x in (v if isinstance(v, list) else [v])]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_finite_at_every_lr_and_dtype(backend, name, rule, dtype):
    """Rates, weights, state and parameters stay finite for every lr in LRS (one group each),
    wherever the torch.optim twin with the same lrs does. The paper's derived combination_lr
    overflowed float32 below lr ~1e-23 (NaN parameters from step 2)."""
    if backend == "triton" and (rule != "defaults" or dtype != torch.float32):
        pytest.skip("the Triton interpreter is slow: the defaults in float32 only (float64 groups step with torch)")
    cls, twin_cls, extra = CLASSES[name]
    twin = twin_cls(_groups(dtype), **extra)
    _run(twin)
    assert all(bool(torch.isfinite(p.float()).all()) for g in twin.param_groups for p in g["params"])
    opt = cls(_groups(dtype), backend=backend, **extra, **RULES[rule])
    _run(opt)
    assert _finite(opt)


@pytest.mark.parametrize("rule", ["defaults", "additive", "multiplicative"])
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_lr_zero_freezes_the_group(backend, name, rule):
    """lr=0 in a group leaves its parameters bit-identical under every rule (the additive rule
    used to learn the rates up from 0), and so does a scheduler that drives the lr to 0."""
    cls, _, extra = CLASSES[name]
    options = {} if rule == "defaults" else dict(hypergrad_rule=rule, hypergrad_lr=1e-2 if rule == "additive" else 0.2)
    opt = cls(_groups(torch.float32, (0.0, 1e-2)), backend=backend, weight_decay=0.1, **extra, **options)
    frozen = [p.clone() for p in opt.param_groups[0]["params"]]
    moving = [p.clone() for p in opt.param_groups[1]["params"]]
    _run(opt, steps=5)
    for p, q in zip(opt.param_groups[0]["params"], frozen):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(opt.param_groups[1]["params"], moving))

    # a schedule to 0: after the factor becomes 0 no parameter moves
    opt = cls(_groups(torch.float32, (1e-2,)), backend=backend, weight_decay=0.1, **extra, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 3 else 0.0)
    _run(opt, steps=3, scheduler=sched)
    held = [p.clone() for p in opt.param_groups[0]["params"]]
    _run(opt, steps=3, scheduler=sched)
    for p, q in zip(opt.param_groups[0]["params"], held):
        assert torch.equal(p, q)


SCHEDULE_SEEDS = (0, 1)
# The weights' largest move that the 2x comparison looks at: below it the weights moved by a
# few percent at most (their multiplicative step only follows the difference between the
# levels' cosines), and the ratio of two such small, trajectory-dependent numbers measures
# nothing. The paper's additive rule moved them by 50 % under OneCycleLR.
WEIGHT_MOVE_FLOOR = 0.05


def _moves(optimizer, lr, schedule, options):
    """Over two seeds of schedule_study's problem: the largest relative change of any rate and
    of any weight from its start, over the run, and of any rate in one step."""
    runs = [run(optimizer, lr, schedule, seed, **options) for seed in SCHEDULE_SEEDS]
    return max(r.rate_move for r in runs), max(r.weight_move for r in runs), max(r.rate_step for r in runs)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_schedules_do_not_speed_up_learning(optimizer):
    """With every multi-level option at its default, the rates and weights move no further
    under OneCycleLR, CyclicLR and warm-up + cosine than in a constant run at the schedule's
    peak lr (within 2x; same data and seeds), and no rate moves by more than the default
    beta (5 %) in one step."""
    lr = 1e-3
    rate_c, weight_c, _ = _moves(optimizer, lr, "constant", {})
    assert rate_c > 0 and weight_c > 0
    for schedule in ("one_cycle", "cyclic", "warmup_cosine"):
        rate_s, weight_s, step = _moves(optimizer, lr, schedule, {})
        assert rate_s <= 2 * rate_c, (schedule, rate_s, rate_c)
        assert weight_s <= max(2 * weight_c, WEIGHT_MOVE_FLOOR), (schedule, weight_s, weight_c)
        assert step <= 0.05


def test_the_paper_additive_rule_fails_the_schedule_check():
    """The check above can fail: the paper's additive rule, passed explicitly, learns far
    faster under OneCycleLR (rates learned at max_lr / 25, steps times s_{t-1}) than at a
    constant lr."""
    paper = dict(hypergrad_rule="additive")
    rate_c, weight_c, _ = _moves("adamw", 1e-2, "constant", paper)
    rate_s, weight_s, _ = _moves("adamw", 1e-2, "one_cycle", paper)
    assert rate_s > 10 * rate_c and weight_s > max(10 * weight_c, WEIGHT_MOVE_FLOOR)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_adam_eps_zero_with_a_late_first_gradient(backend):
    """eps=0 (a legal Adam option): a parameter whose first gradient comes at step 3 has
    u_prev = 0 there (docs/algorithm.md: it never stepped), not m / sqrt(v) = 0/0, which made every rate and
    parameter NaN on all backends."""
    params = make_params(dtype=torch.float32, shapes=SHAPES)
    opt = mlhd.MultiLevelAdam(params, lr=1e-2, eps=0.0, backend=backend)
    gradfn = GradFn(SHAPES)
    for s in range(4):
        for i, p in enumerate(params):
            p.grad = gradfn.grad(s, i, p) if i == 0 or s >= 2 else None
        opt.step()
    assert _finite(opt)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("backend", ["reference"] + [b for b in FAST_BACKENDS if b != "triton"])
def test_pytorch_quadratic_with_weight_decay(backend, name, maximize):
    """PyTorch's basic test problem (test_optim's _test_basic_cases: (w @ x + b)^2 summed) at
    lr 1e-3 with weight decay 0.1, 25 steps, every multi-level option at its default: finite
    and going the right way. With the paper's additive rule MultiLevelSGD maximising it took
    its rates from 1e-3 to 5e8 in 8 steps, then NaN."""
    gen = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen), torch.randn(5, generator=gen))
    w.requires_grad_(True)
    b.requires_grad_(True)
    cls, _, extra = CLASSES[name]
    opt = cls([w, b], lr=1e-3, weight_decay=0.1, maximize=maximize, backend=backend, **extra)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = (w @ x + b).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert _finite(opt)
    assert losses[-1] > losses[0] if maximize else losses[-1] < losses[0]
