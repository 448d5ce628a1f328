"""Special cases the spec pins to known algorithms (docs/algorithm.md section 3, last paragraph).

* ``levels=("global",)`` with ``rate_bounds=None`` is Baydin et al.'s SGD-HD / SGDN-HD /
  Adam-HD, except that all tensors' sums are taken before any tensor steps.  The loops below
  are written from docs/algorithm.md sections 1-3; with one level the weight is 1 and, with
  ``hypergrad_scaling="size"``, ``b = beta * N / N = beta``.
* ``hypergrad_lr=0`` is exactly torch.optim.SGD / Adam / AdamW.
"""

import pytest
import torch

import multilevel_hd as mlhd
from conftest import DEVICE, FAST_BACKENDS
from trajectory import GradFn, make_params

BACKENDS = ["reference"] + FAST_BACKENDS
STEPS = 12


def _set_grads(params, gf, step):
    for i, p in enumerate(params):
        p.grad = gf.grad(step, i, p)


# ------------------------------------------------------------------------------------------
# Baydin et al. HD loops
# ------------------------------------------------------------------------------------------
def baydin_sgd_hd(params, gf, lr, beta, steps, momentum=0.0, nesterov=False):
    """SGD-HD (momentum 0) / SGDN-HD, one global rate; returns per-step (params, alpha)."""
    ps = [p.detach().clone() for p in params]
    alpha = lr
    u_prev = [torch.zeros_like(p) for p in ps]
    bufs = [None] * len(ps)
    out = []
    for s in range(steps):
        gs = [gf.grad(s, i, p) for i, p in enumerate(ps)]
        live = [i for i, p in enumerate(ps) if p.numel() > 0]
        if s >= 1:  # t >= 2: one sum over all tensors before any tensor steps
            alpha = alpha + beta * sum(float((gs[i] * u_prev[i]).sum()) for i in live)
        for i in live:
            g = gs[i]
            if momentum > 0:
                bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
                u = g + momentum * bufs[i] if nesterov else bufs[i]
            else:
                u = g
            ps[i] = ps[i] - alpha * u
            u_prev[i] = u
        out.append(([p.clone() for p in ps], alpha))
    return out


def baydin_adam_hd(params, gf, lr, beta, steps, betas=(0.9, 0.999), eps=1e-8):
    ps = [p.detach().clone() for p in params]
    alpha = lr
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    u_prev = [torch.zeros_like(p) for p in ps]
    out = []
    for s in range(steps):
        t = s + 1
        gs = [gf.grad(s, i, p) for i, p in enumerate(ps)]
        live = [i for i, p in enumerate(ps) if p.numel() > 0]
        if t >= 2:
            alpha = alpha + beta * sum(float((gs[i] * u_prev[i]).sum()) for i in live)
        for i in live:
            g = gs[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            ps[i] = ps[i] - alpha * u
            u_prev[i] = u
        out.append(([p.clone() for p in ps], alpha))
    return out


HD_CASES = [
    ("SGD-HD", dict(lr=0.05, beta=2e-5)),
    ("SGDN-HD", dict(lr=0.02, beta=1e-5, momentum=0.9, nesterov=True)),
    ("Adam-HD", dict(lr=0.01, beta=5e-6)),
]


@pytest.mark.parametrize("scaling", ["size", "none"])
@pytest.mark.parametrize("name,cfg", HD_CASES, ids=[c[0] for c in HD_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_level_is_baydin_hd(backend, name, cfg, scaling):
    cfg = dict(cfg)
    lr, beta = cfg.pop("lr"), cfg.pop("beta")
    params = make_params(torch.float64)
    gf = GradFn()
    if name == "Adam-HD":
        expected = baydin_adam_hd(params, gf, lr, beta, STEPS)
        opt_params = [p.detach().clone().to(DEVICE).requires_grad_() for p in params]
        opt = mlhd.MultiLevelAdam(opt_params, lr=lr, levels=("global",), hypergrad_rule="additive", hypergrad_lr=beta,
                                  hypergrad_scaling=scaling, rate_bounds=None, backend=backend)
    else:
        expected = baydin_sgd_hd(params, gf, lr, beta, STEPS, **cfg)
        opt_params = [p.detach().clone().to(DEVICE).requires_grad_() for p in params]
        opt = mlhd.MultiLevelSGD(opt_params, lr=lr, levels=("global",), hypergrad_rule="additive", hypergrad_lr=beta,
                                 hypergrad_scaling=scaling, rate_bounds=None, backend=backend,
                                 **cfg)
    assert abs(expected[-1][1] - lr) > 0.1 * lr, "the rate must move for this test to bite"
    for s in range(STEPS):
        _set_grads(opt_params, gf, s)
        opt.step()
        exp_params, exp_alpha = expected[s]
        r = opt.rates()[0]
        assert set(r) == {"weights", "global"}
        torch.testing.assert_close(r["global"].double().cpu(), torch.tensor(exp_alpha, dtype=torch.float64),
                                   rtol=1e-10, atol=0, msg=lambda m: f"{name} step {s} alpha: {m}")
        torch.testing.assert_close(r["weights"].double().cpu(), torch.ones(1, dtype=torch.float64))
        for i, (p, q) in enumerate(zip(opt_params, exp_params)):
            torch.testing.assert_close(p.detach().cpu(), q, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name} step {s} param {i}: {m}")
            if p.numel():
                torch.testing.assert_close(
                    opt.effective_rate(p).double().cpu(),
                    torch.full(p.shape, exp_alpha, dtype=torch.float64), rtol=1e-10, atol=0)


def test_baydin_loops_differ_from_plain():
    """Sanity of the test itself: the HD loops are not plain SGD/Adam."""
    params = make_params(torch.float64)
    gf = GradFn()
    a = baydin_sgd_hd(params, gf, 0.05, 2e-5, STEPS)[-1][0]
    b = baydin_sgd_hd(params, gf, 0.05, 0.0, STEPS)[-1][0]
    assert max(float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()) > 1e-3


# ------------------------------------------------------------------------------------------
# hypergrad_lr = 0 is torch.optim
# ------------------------------------------------------------------------------------------
TORCH_CASES = [
    ("SGD", dict(lr=0.05), dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3), dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.03, momentum=0.9, nesterov=True), dict(lr=0.03, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, weight_decay=0.1), dict(lr=0.05, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, maximize=True, momentum=0.5), dict(lr=0.05, maximize=True, momentum=0.5)),
    ("Adam", dict(lr=0.01), dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-4), dict(lr=0.01, betas=(0.8, 0.99), eps=1e-4)),
    ("Adam", dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, maximize=True), dict(lr=0.01, maximize=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01), dict(lr=0.01)),  # both classes' default weight_decay is 1e-2
    ("AdamDecoupled", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
     dict(lr=0.01, weight_decay=0.1)),
    # beta2 = 0.9: v falls after large gradients, so the maximum binds and any other order
    # (the maximum of the bias-corrected v, or of v before this step's update) differs
    ("Adam", dict(lr=0.01, betas=(0.9, 0.9), amsgrad=True), dict(lr=0.01, betas=(0.9, 0.9), amsgrad=True)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, amsgrad=True),
     dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, amsgrad=True)),
]
ML = {"SGD": mlhd.MultiLevelSGD, "Adam": mlhd.MultiLevelAdam, "AdamW": mlhd.MultiLevelAdamW,
      "AdamDecoupled": mlhd.MultiLevelAdam}
TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW,
         "AdamDecoupled": torch.optim.AdamW}
HD_VARIANTS = {
    "default-levels": dict(),
    "all-levels": dict(levels=("param", "unit", "layer", "global")),
    "multiplicative": dict(levels=("global", "layer"), hypergrad_rule="multiplicative",
                           init_weights=(1.0, 3.0)),
}


@pytest.mark.parametrize("variant", [pytest.param(v, marks=() if v == "default-levels" else
                                                  pytest.mark.heavy) for v in HD_VARIANTS])
@pytest.mark.parametrize("cls,ml_kw,torch_kw", TORCH_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(TORCH_CASES)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hypergrad_lr_is_torch_optim(backend, cls, ml_kw, torch_kw, variant):
    base = make_params(torch.float64)
    gf = GradFn()
    ours = [p.detach().clone().to(DEVICE).requires_grad_() for p in base]
    theirs = [p.detach().clone().requires_grad_() for p in base]
    opt = ML[cls](ours, hypergrad_lr=0.0, backend=backend, **ml_kw, **HD_VARIANTS[variant])
    ref = TORCH[cls](theirs, foreach=False, **torch_kw)
    lr = ml_kw["lr"]
    for s in range(STEPS):
        _set_grads(ours, gf, s)
        _set_grads(theirs, gf, s)
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"step {s} param {i}: {m}")
    for p in ours:
        if p.numel():
            torch.testing.assert_close(opt.effective_rate(p).double().cpu(),
                                       torch.full(p.shape, lr, dtype=torch.float64),
                                       rtol=1e-12, atol=0)
    moved = max(float((p.detach().cpu() - q.detach()).abs().max())
                for p, q in zip(ours, base) if p.numel())
    assert moved > 0.05
