"""LR schedulers (README, "LR schedulers"): a scheduled ``group["lr"]`` multiplies the applied
rate by ``lr / initial_lr`` and the hyper-gradient goes through the rate that was applied:

    kappa_t = s_t * (tau_t * alpha*_t + (1 - tau_t) * final_lr),   s_t = lr_t / initial_lr
    alpha_k <- alpha_k + b_k * s_{t-1} * tau_{t-1} * w_k * S_k   (and the same factor in G_k)

Checked against torch.optim with the same scheduler (hypergrad_lr=0), against a hand-written
Adam-HD with the chain rule, across backends, and through a state-dict round trip.
"""
from __future__ import annotations

import copy

import pytest
import torch

import multilevel_hd as mlhd
from conftest import FAST_BACKENDS, shapes_for
from trajectory import TOL_F32, TOL_F64, GradFn, assert_trajectories_close, make_params, run_optimizer

STEPS = 8
LR = 0.01


def warmup(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, (epoch + 1) / 4))


def cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=LR / 10)


def one_cycle(opt):
    # cycle_momentum would also schedule Adam's beta1 / SGD's momentum; that is tested
    # against torch.optim below, and kept off where u_prev is recomputed from the betas
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * LR, total_steps=STEPS + 1, cycle_momentum=False)


SCHEDULERS = {"warmup": warmup, "cosine": cosine, "one_cycle": one_cycle}


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("schedule", ["warmup", "cosine", "one_cycle_momentum"])
def test_without_hypergradient_it_is_torch_optim_under_the_same_scheduler(backend, kind, schedule):
    """hypergrad_lr=0: kappa = lr_t exactly as torch.optim applies it, even when OneCycleLR
    also cycles the momentum / beta1."""
    shapes = shapes_for(backend)
    ours_p, ref_p = make_params(shapes=shapes), make_params(shapes=shapes)
    if kind == "adam":
        ours = mlhd.MultiLevelAdam(ours_p, lr=LR, hypergrad_lr=0.0, levels=("global", "unit"), backend=backend)
        ref = torch.optim.Adam(ref_p, lr=LR)
    else:
        ours = mlhd.MultiLevelSGD(ours_p, lr=LR, momentum=0.9, nesterov=True, hypergrad_lr=0.0, backend=backend)
        ref = torch.optim.SGD(ref_p, lr=LR, momentum=0.9, nesterov=True)

    def make(opt):
        if schedule == "one_cycle_momentum":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * LR, total_steps=STEPS + 1)
        return SCHEDULERS[schedule](opt)

    sched_ours, sched_ref = make(ours), make(ref)
    gradfn = GradFn(shapes)
    lrs = set()
    for s in range(STEPS):
        lrs.add(ours.param_groups[0]["lr"])
        for i, (p, q) in enumerate(zip(ours_p, ref_p)):
            p.grad, q.grad = gradfn.grad(s, i, p), gradfn.grad(s, i, q)
        ours.step()
        ref.step()
        sched_ours.step()
        sched_ref.step()
        for p, q in zip(ours_p, ref_p):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=lambda m: f"step {s}: {m}")
    assert len(lrs) > 2  # the scheduler did move the lr


def test_adam_hd_follows_the_chain_rule_through_the_scheduled_rate():
    """Baydin's Adam-HD with a warm-up, written out: alpha += beta * s_{t-1} * g_t . u_{t-1},
    kappa_t = s_t * alpha. Ignoring s_{t-1} (or applying alpha unscaled) fails this."""
    beta = 1e-4
    params = make_params()
    mine = [p.detach().clone() for p in params]
    opt = mlhd.MultiLevelAdam(params, lr=LR, levels=("global",), hypergrad_rule="additive", hypergrad_lr=beta,
                              rate_bounds=None, backend="reference")
    sched = warmup(opt)
    factors = [min(1.0, (e + 1) / 4) for e in range(STEPS)]
    gradfn = GradFn()
    m = [torch.zeros_like(p) for p in mine]
    v = [torch.zeros_like(p) for p in mine]
    u_prev = [torch.zeros_like(p) for p in mine]
    alpha = LR
    for t in range(1, STEPS + 1):
        grads = [gradfn.grad(t - 1, i, p) for i, p in enumerate(mine)]
        if t >= 2:
            alpha += beta * factors[t - 2] * sum(float((g * u).sum()) for g, u in zip(grads, u_prev))
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            u_prev[i] = (m[i] / (1 - 0.9**t)) / ((v[i] / (1 - 0.999**t)).sqrt() + 1e-8)
            mine[i] -= factors[t - 1] * alpha * u_prev[i]
        for i, p in enumerate(params):
            p.grad = gradfn.grad(t - 1, i, p)
        opt.step()
        sched.step()
        torch.testing.assert_close(opt.rates()[0]["global"], torch.tensor(alpha, dtype=torch.float64),
                                   rtol=1e-12, atol=0)
        for p, q in zip(params, mine):
            torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)
    assert abs(alpha / LR - 1) > 1e-3  # the rate did move


CASES = {
    "adam-all-levels": (mlhd.MultiLevelAdam, dict(levels=("global", "layer", "unit", "param"), hypergrad_lr=3e-6,
                                                  init_weights=(1, 2, 3, 4), hd_decay=0.05)),
    "adamw-shrink": (mlhd.MultiLevelAdamW, dict(levels=("unit", "global"), hypergrad_lr=3e-6, weight_decay=0.1,
                                                shrinkage={"unit": 0.3})),
    "sgd-nesterov": (mlhd.MultiLevelSGD, dict(levels=("layer", "param"), hypergrad_lr=1e-5, momentum=0.9,
                                              nesterov=True)),
    "sgd-multiplicative": (mlhd.MultiLevelSGD, dict(levels=("global", "unit"), hypergrad_rule="multiplicative",
                                                    hypergrad_lr=0.05, combination_lr=2.0)),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULERS))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backends_match_the_reference_under_a_scheduler(backend, dtype, case, schedule):
    shapes = shapes_for(backend)
    cls, kwargs = CASES[case]

    def trajectory(b, dtype):
        opt = cls(make_params(dtype, shapes=shapes), lr=LR, backend=b, **kwargs)
        return run_optimizer(opt, GradFn(shapes), STEPS, scheduler=SCHEDULERS[schedule](opt))

    ours, ref = trajectory(backend, dtype), trajectory("reference", torch.float64)
    tol = TOL_F64 if dtype == torch.float64 else TOL_F32
    assert_trajectories_close(ours, ref, tol, label=f"{backend} {case} {schedule}")


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_state_dict_round_trip_keeps_the_scheduler_interplay(backend):
    """Save optimizer and scheduler mid-warm-up, load both into fresh objects: the run goes
    on exactly as the uninterrupted one (the saved lr_scale enters the next hyper-gradient)."""
    shapes = shapes_for(backend)
    cls, kwargs = CASES["adam-all-levels"]
    gradfn = GradFn(shapes)

    opt = cls(make_params(shapes=shapes), lr=LR, backend=backend, **kwargs)
    sched = warmup(opt)
    whole = run_optimizer(opt, gradfn, STEPS, scheduler=sched)

    params = make_params(shapes=shapes)
    first = cls(params, lr=LR, backend=backend, **kwargs)
    first_sched = warmup(first)
    run_optimizer(first, gradfn, 2, scheduler=first_sched)
    saved = copy.deepcopy((first.state_dict(), first_sched.state_dict()))

    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = cls(resumed_params, lr=LR, backend=backend, **kwargs)
    resumed_sched = warmup(resumed)
    resumed.load_state_dict(saved[0])
    resumed_sched.load_state_dict(saved[1])
    assert resumed.group_states[0]["lr_scale"] != 1  # saved mid-warm-up
    rest = run_optimizer(resumed, gradfn, STEPS - 2, start=2, scheduler=resumed_sched)
    assert_trajectories_close(rest, whole[2:], TOL_F64, label=f"{backend} resumed")


def test_rates_start_at_the_base_lr_and_the_factor_scales_kappa():
    """A warm-up lowers group["lr"] before the first step: rates still start at the lr the
    optimizer was built with, and the first step applies factor * lr."""
    params = make_params()
    opt = mlhd.MultiLevelSGD(params, lr=LR, levels=("global", "unit"), backend="reference")
    warmup(opt)  # lr now LR / 4
    assert opt.param_groups[0]["initial_lr"] == LR and opt.param_groups[0]["lr"] == LR / 4
    before = [p.detach().clone() for p in params]
    grads = GradFn().grads(0, params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert float(opt.rates()[0]["global"]) == LR
    for p, q, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), q - LR / 4 * g, rtol=1e-14, atol=1e-16)
        torch.testing.assert_close(opt.effective_rate(p), torch.full_like(p, LR / 4), rtol=1e-14, atol=0)


def test_a_hand_set_lr_scales_kappa_too():
    """Without a scheduler, editing group["lr"] is the same factor (initial_lr is set at
    construction), so manual decay keeps working."""
    params = make_params()
    opt = mlhd.MultiLevelSGD(params, lr=LR, hypergrad_lr=0.0, backend="reference")
    opt.param_groups[0]["lr"] = LR / 10
    before = [p.detach().clone() for p in params]
    grads = GradFn().grads(0, params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p, q, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), q - LR / 10 * g, rtol=1e-14, atol=1e-16)
