"""Shared helpers for the multilevel_hd test suite.

Everything here is derived from docs/algorithm.md, not from the implementation:

* ``make_params``   -- a small parameter set covering every tensor layout the spec names
                       (0-d, 1-D, 2-D, 4-D conv, a single-row (1, n) tensor, a channels_last
                       conv weight, an empty tensor).
* ``GradFn``        -- deterministic synthetic gradients ``g = A * p + s * noise_t`` that depend
                       on the current parameters, so a trajectory reacts to the optimizer.
* ``Oracle``        -- an independent float64 implementation of docs/algorithm.md sections 2-3, written
                       from the spec text only.  It is used to check the ``reference`` backend,
                       which in turn is the oracle for the fast backends.
* ``run_optimizer`` / ``run_oracle`` -- drive a trajectory and record a snapshot per step.
* ``assert_snapshots_close`` -- compare two recorded trajectories with helpful messages.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

import multilevel_hd as mlhd

LEVELS = ("global", "layer", "unit", "param")  # coarse to fine
COARSE_RANK = {name: i for i, name in enumerate(LEVELS)}

# (shape, layout): layout True = channels_last, "t" = transposed 2-D (strides (1, rows)).
# Numels 1 + 7 + 30 + 48 + 9 + 54 + 0 + 12 = 161.
DEFAULT_SHAPES = (
    ((), False),            # 0-d
    ((7,), False),          # 1-D (7 units of one element)
    ((5, 6), False),        # Linear weight
    ((4, 3, 2, 2), False),  # conv weight
    ((1, 9), False),        # single row
    ((3, 2, 3, 3), True),   # channels_last conv weight
    ((0, 3), False),        # empty
    ((4, 3), "t"),          # non-contiguous (transposed) Linear weight
)
# A smaller set for slow backends (still every layout).
SMALL_SHAPES = (
    ((), False),
    ((3,), False),
    ((2, 3), False),
    ((2, 2, 1, 2), False),
    ((1, 4), False),
    ((2, 2, 2, 2), True),
    ((0, 3), False),
    ((2, 3), "t"),
)

CLASS_KIND = {
    "SGD": "sgd",
    "Adam": "adam",
    "AdamW": "adamw",
}


def opt_class(name: str):
    return {
        "SGD": mlhd.MultiLevelSGD,
        "Adam": mlhd.MultiLevelAdam,
        "AdamW": mlhd.MultiLevelAdamW,
    }[name]


# --------------------------------------------------------------------------------------
# parameters and gradients
# --------------------------------------------------------------------------------------
def make_params(dtype=torch.float64, device="cpu", seed=0, shapes=DEFAULT_SHAPES):
    """Random, never-zero leaf tensors (values in +-[0.5, 1.5])."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = []
    for shape, cl in shapes:
        mag = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
        v = (mag * sign).to(dtype)
        if cl == "t":  # a transposed (column-major) 2-D tensor: strides (1, rows)
            v = v.t().contiguous().t()
        elif cl:
            v = v.contiguous(memory_format=torch.channels_last)
        v = v.to(device)
        v.requires_grad_(True)
        out.append(v)
    return out


def clone_params(params, dtype=None, device=None):
    out = []
    for p in params:
        q = p.detach().clone(memory_format=torch.preserve_format)
        if dtype is not None or device is not None:
            q = q.to(dtype=dtype or q.dtype, device=device or q.device,
                     memory_format=torch.preserve_format)
        q.requires_grad_(True)
        out.append(q)
    return out


class GradFn:
    """Deterministic gradients ``g = sign * (A * p + s * noise(step, i))``.

    ``A`` is a fixed per-element curvature in [0.3, 1.7]; ``s`` a fixed per-element noise
    scale, log-uniform in [0.02, 1] (so some elements have consistent gradients and the
    rates grow, others are noisy); the noise depends on (seed, step, tensor index) only.
    Computed in float64 from the current parameter values, then cast to the parameter's
    dtype/device/memory format.

    ``none``: set of (step, index) pairs whose gradient is None.
    ``poison``: dict (step, index) -> value written into element 0 of that gradient.
    """

    def __init__(self, shapes=DEFAULT_SHAPES, seed=0, sign=1.0, noise=1.0, none=(), poison=None):
        self.seed = seed
        self.sign = sign
        self.noise = noise
        self.none = set(none)
        self.poison = dict(poison or {})
        gen = torch.Generator().manual_seed(2000 + seed)
        self.A = []
        self.S = []
        for shape, _ in shapes:
            self.A.append(torch.rand(shape, generator=gen, dtype=torch.float64) * 1.4 + 0.3)
            self.S.append(torch.exp(torch.rand(shape, generator=gen, dtype=torch.float64)
                                    * math.log(50.0)) / 50.0)

    def grad(self, step: int, i: int, p: torch.Tensor) -> Optional[torch.Tensor]:
        if (step, i) in self.none:
            return None
        gen = torch.Generator().manual_seed(10_000 * (self.seed + 1) + 97 * step + i)
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p64 = p.detach().to(device="cpu", dtype=torch.float64)
        g = self.sign * (self.A[i] * p64 + self.noise * self.S[i] * noise)
        if (step, i) in self.poison and g.numel() > 0:
            g.view(-1)[0] = self.poison[(step, i)]
        out = torch.empty_like(p.detach(), memory_format=torch.preserve_format)
        out.copy_(g.to(p.dtype))
        return out

    def grads(self, step, params):
        return [self.grad(step, i, p) for i, p in enumerate(params)]


# --------------------------------------------------------------------------------------
# the independent oracle (docs/algorithm.md sections 2 and 3), float64 throughout
# --------------------------------------------------------------------------------------
def n_units(shape) -> int:
    return 1 if len(shape) == 0 else shape[0]


def expand(level: str, rates, i: int, shape) -> torch.Tensor:
    """alpha_k[idx_k(e)] for every element e of tensor i (shape ``shape``)."""
    if level == "global":
        return rates.expand(shape)
    if level == "layer":
        return rates[i].expand(shape)
    if level == "unit":
        r = rates[i]
        if len(shape) == 0:
            return r.reshape(())
        return r.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape)
    return rates[i]


def level_sum(level: str, x: torch.Tensor):
    """S_k over the groups of ``level`` for one tensor (global: the tensor's total)."""
    if level in ("global", "layer"):
        return x.sum()
    if level == "unit":
        if x.dim() == 0:
            return x.reshape(1)
        return x.reshape(x.shape[0], -1).sum(1)
    return x.clone()


def resolve_options(kind: str, opts: Dict[str, Any]) -> Dict[str, Any]:
    """The group options with every docs/algorithm.md default filled in."""
    o = dict(opts)
    if kind == "sgd":
        o.setdefault("lr", 1e-2)
        o.setdefault("momentum", 0.0)
        o.setdefault("dampening", 0.0)
        o.setdefault("nesterov", False)
        o.setdefault("weight_decay", 0.0)
        o["decoupled_weight_decay"] = False
    else:
        o.setdefault("lr", 1e-3)
        o.setdefault("betas", (0.9, 0.999))
        o.setdefault("eps", 1e-8)
        o.setdefault("amsgrad", False)
        if kind == "adamw":
            o.setdefault("weight_decay", 1e-2)
            o.setdefault("decoupled_weight_decay", True)
        else:
            o.setdefault("weight_decay", 0.0)
            o.setdefault("decoupled_weight_decay", False)
    o.setdefault("maximize", False)
    o.setdefault("levels", ("global", "unit"))
    o["levels"] = tuple(o["levels"])
    o.setdefault("hypergrad_rule", "multiplicative")  # the safe default (README, "The defaults")
    o.setdefault("hypergrad_scaling", "size")
    o.setdefault("rate_bounds", (0.0, None))
    o.setdefault("hd_decay", 0.0)
    o.setdefault("skip_nonfinite", True)
    levels = o["levels"]
    K = len(levels)
    iw = o.get("init_weights")
    if iw is None:
        iw = (0.8, 0.2) if levels == ("global", "unit") else tuple([1.0 / K] * K)
    iw = torch.tensor([float(x) for x in iw], dtype=torch.float64)
    o["init_weights"] = iw / iw.sum()
    beta = o.get("hypergrad_lr")
    if beta is None:
        if o["hypergrad_rule"] == "multiplicative":
            beta = 0.05
        else:
            beta = 1e-6 if kind == "sgd" else 1e-8
    if isinstance(beta, dict):
        beta = {k: float(beta[k]) for k in levels}
    else:
        beta = {k: float(beta) for k in levels}
    o["beta"] = beta
    delta = o.get("combination_lr")
    if delta is None:
        mb = min(beta.values())
        if o["hypergrad_rule"] == "additive":  # capped at float32's largest number
            delta = min(mb / o["lr"] / o["lr"], 3.4028234663852886e38) if o["lr"] > 0 else 0.0
        else:
            delta = mb
    o["delta"] = float(delta)
    o["shrinkage"] = dict(o.get("shrinkage") or {})
    if o.get("final_lr") is None:
        o["final_lr"] = o["lr"]
    return o


class OracleGroup:
    def __init__(self, params: List[torch.Tensor], kind: str, opts: Dict[str, Any]):
        self.kind = kind
        self.o = resolve_options(kind, opts)
        self.params = [p.detach().to(torch.float64).clone() for p in params]
        lr = float(self.o["lr"])
        f = lambda *s: torch.full(s, lr, dtype=torch.float64)
        self.rates = {}
        for lv in self.o["levels"]:
            if lv == "global":
                self.rates[lv] = torch.tensor(lr, dtype=torch.float64)
            elif lv == "layer":
                self.rates[lv] = [torch.tensor(lr, dtype=torch.float64) for _ in self.params]
            elif lv == "unit":
                self.rates[lv] = [f(n_units(p.shape)) for p in self.params]
            else:
                self.rates[lv] = [torch.full(p.shape, lr, dtype=torch.float64) for p in self.params]
        self.weights = self.o["init_weights"].clone()
        self.t = 0
        self.skipped = 0
        self.pstate = [dict(step=0) for _ in self.params]
        self.eff = [None for _ in self.params]

    # ---------------------------------------------------------------- base direction
    def _direction(self, i, g):
        st = self.pstate[i]
        st["step"] += 1
        o = self.o
        if self.kind == "sgd":
            mu = o["momentum"]
            if mu == 0:
                return g.clone()
            if "buf" not in st:
                st["buf"] = g.clone()
            else:
                st["buf"] = mu * st["buf"] + (1 - o["dampening"]) * g
            return g + mu * st["buf"] if o["nesterov"] else st["buf"].clone()
        b1, b2 = o["betas"]
        if "m" not in st:
            st["m"] = torch.zeros_like(g)
            st["v"] = torch.zeros_like(g)
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        if o["amsgrad"]:  # docs/algorithm.md section 3: vmax = max(vmax, v) replaces v
            st["vmax"] = torch.maximum(st.get("vmax", st["v"]), st["v"])
        s = st["step"]
        mhat = st["m"] / (1 - b1 ** s)
        vhat = st["vmax" if o["amsgrad"] else "v"] / (1 - b2 ** s)
        return mhat / (vhat.sqrt() + o["eps"])

    # ---------------------------------------------------------------- one step
    def step(self, grads: Sequence[Optional[torch.Tensor]]):
        o = self.o
        active = [i for i, p in enumerate(self.params) if grads[i] is not None and p.numel() > 0]
        if not active:
            return
        gs = {}
        for i in active:
            g = grads[i].detach().to(device="cpu", dtype=torch.float64).clone()
            if o["maximize"]:
                g = -g
            if o["weight_decay"] > 0 and not o["decoupled_weight_decay"]:
                g = g + o["weight_decay"] * self.params[i]
            gs[i] = g
        if o["skip_nonfinite"] and any(not bool(torch.isfinite(g).all()) for g in gs.values()):
            self.skipped += 1
            return
        self.t += 1
        t = self.t
        levels = o["levels"]
        w_old = self.weights.clone()
        if t >= 2:
            self._hd_update(active, gs, w_old)
        # base directions and the parameter update
        tau_t = math.exp(-o["hd_decay"] * t)
        for i in active:
            u = self._direction(i, gs[i])
            p = self.params[i]
            astar = torch.zeros_like(p)
            for k, lv in enumerate(levels):
                astar = astar + w_old[k] * expand(lv, self.rates[lv], i, p.shape)
            kappa = tau_t * astar + (1 - tau_t) * o["final_lr"]
            if o["decoupled_weight_decay"] and o["weight_decay"] > 0:
                p = p * (1 - kappa * o["weight_decay"])
            p = p - kappa * u
            self.params[i] = p
            self.pstate[i]["u_prev"] = u
            self.eff[i] = kappa.clone()

    def _hd_update(self, active, gs, w_old):
        o = self.o
        levels = o["levels"]
        t = self.t
        tau_prev = math.exp(-o["hd_decay"] * (t - 1))
        N = sum(self.params[i].numel() for i in active)
        up = {i: self.pstate[i].get("u_prev", torch.zeros_like(gs[i])) for i in active}
        h = {i: gs[i] * up[i] for i in active}
        old = {lv: copy.deepcopy(self.rates[lv]) for lv in levels}
        mult = o["hypergrad_rule"] == "multiplicative"

        # HD-updated (unshrunk) rates a_k
        a = {}
        for k, lv in enumerate(levels):
            beta = o["beta"][lv]
            wk = float(w_old[k])
            if lv == "global":
                S = sum(h[i].sum() for i in active)
                Qg = sum((gs[i] ** 2).sum() for i in active)
                Qu = sum((up[i] ** 2).sum() for i in active)
                if mult:
                    c = S / torch.sqrt(Qg * Qu) if float(Qg * Qu) > 0 else torch.zeros(())
                    a[lv] = old[lv] * (1 + beta * wk * c)
                else:
                    b = beta * N / N if o["hypergrad_scaling"] == "size" else beta
                    a[lv] = old[lv] + b * tau_prev * wk * S
                continue
            new = [r.clone() for r in old[lv]]
            for i in active:
                p = self.params[i]
                S = level_sum(lv, h[i])
                if mult:
                    if lv == "param":
                        c = torch.sign(h[i])
                    else:
                        Qg = level_sum(lv, gs[i] ** 2)
                        Qu = level_sum(lv, up[i] ** 2)
                        prod = Qg * Qu
                        c = torch.where(prod > 0, S / torch.sqrt(torch.where(prod > 0, prod, torch.ones_like(prod))),
                                        torch.zeros_like(S))
                    new[i] = old[lv][i] * (1 + beta * wk * c)
                else:
                    if o["hypergrad_scaling"] == "size":
                        Nk = {"layer": p.numel(), "unit": p.numel() // n_units(p.shape), "param": 1}[lv]
                        b = beta * N / Nk
                    else:
                        b = beta
                    new[i] = old[lv][i] + b * tau_prev * wk * S
            a[lv] = new

        # shrinkage toward the next coarser active level (its unshrunk a), then clamp
        result = {}
        for lv in levels:
            rho = float(o["shrinkage"].get(lv, 0.0))
            parents = [q for q in levels if COARSE_RANK[q] < COARSE_RANK[lv]]
            parent = max(parents, key=lambda q: COARSE_RANK[q]) if parents else None
            if lv == "global":  # never has a parent
                result[lv] = a[lv]
                continue
            new = [x.clone() for x in a[lv]]
            if rho > 0 and parent is not None:
                for i in active:
                    shape = self.params[i].shape
                    if lv == "param":
                        par = expand(parent, a[parent], i, shape)
                    else:  # unit -> layer or global, layer -> global: one parent value
                        par = expand(parent, a[parent], i, ()).expand(new[i].shape)
                    new[i] = (1 - rho) * a[lv][i] + rho * par
            result[lv] = new
        bounds = o["rate_bounds"]
        if bounds is not None:
            lo, hi = bounds

            def clamp(x):
                return torch.clamp(x, min=lo, max=hi)
        else:
            def clamp(x):
                return x
        for lv in levels:
            if lv == "global":
                self.rates[lv] = clamp(result[lv])
            else:
                cur = [r.clone() for r in old[lv]]  # inactive tensors: untouched
                for i in active:
                    cur[i] = clamp(result[lv][i])
                self.rates[lv] = cur

        # combination weights
        K = len(levels)
        if K > 1:
            w = w_old.clone()
            U = sum((up[i] ** 2).sum() for i in active)
            for k, lv in enumerate(levels):
                Gs = sum((expand(lv, old[lv], i, self.params[i].shape) * h[i]).sum() for i in active)
                if mult:
                    R = sum(((expand(lv, old[lv], i, self.params[i].shape) * gs[i]) ** 2).sum()
                            for i in active)
                    if float(R * U) > 0:
                        w[k] = w_old[k] * (1 + o["delta"] * Gs / torch.sqrt(R * U))
                else:
                    w[k] = w_old[k] + o["delta"] * tau_prev * Gs
            w = torch.clamp(w, min=0.0)
            s = w.sum()
            self.weights = w / s if float(s) > 0 else torch.full((K,), 1.0 / K, dtype=torch.float64)

    # ---------------------------------------------------------------- snapshots
    def snapshot(self):
        rates = {"weights": self.weights.clone()}
        for lv in self.o["levels"]:
            r = self.rates[lv]
            rates[lv] = r.clone() if lv == "global" else [x.clone() for x in r]
        eff = [None if e is None else e.clone() for e in self.eff]
        return dict(params=[p.clone() for p in self.params], rates=[rates], eff=eff,
                    skipped=[self.skipped])


class Oracle:
    """Several independent groups (docs/algorithm.md: everything is per param group)."""

    def __init__(self, groups: List[Dict[str, Any]], kind: str):
        self.groups = []
        for gdict in groups:
            d = dict(gdict)
            ps = d.pop("params")
            self.groups.append(OracleGroup(ps, kind, d))

    def step(self, grads_per_group):
        for g, grads in zip(self.groups, grads_per_group):
            g.step(grads)

    def snapshot(self):
        snaps = [g.snapshot() for g in self.groups]
        return dict(params=sum((s["params"] for s in snaps), []),
                    rates=sum((s["rates"] for s in snaps), []),
                    eff=sum((s["eff"] for s in snaps), []),
                    skipped=sum((s["skipped"] for s in snaps), []))


# --------------------------------------------------------------------------------------
# running trajectories
# --------------------------------------------------------------------------------------
def _f64(x):
    return x.detach().to(device="cpu", dtype=torch.float64).clone()


def opt_snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    rates = []
    for r in opt.rates():
        d = {}
        for k, v in r.items():
            d[k] = [_f64(x) for x in v] if isinstance(v, (list, tuple)) else _f64(v)
        rates.append(d)
    eff = []
    for p in params:
        try:
            e = opt.effective_rate(p)
        except Exception:  # never stepped: unspecified
            e = None
        eff.append(None if e is None else _f64(e))
    return dict(params=[_f64(p) for p in params], rates=rates, eff=eff,
                skipped=list(opt.skipped_steps()))


def params_snapshot(opt):
    """What ``run_optimizer`` can record of any torch.optim optimizer: its parameters."""
    return dict(params=[_f64(p) for g in opt.param_groups for p in g["params"]])


def run_optimizer(opt, gradfn: GradFn, steps: int, start: int = 0, scheduler=None, snapshot=opt_snapshot):
    """Step ``opt`` ``steps`` times; gradient of step s is ``gradfn.grad(s, i, p)`` with i the
    parameter's index over all groups; an LR ``scheduler`` steps after each optimizer step.
    Returns the list of per-step snapshots (``params_snapshot`` for a torch.optim optimizer)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    snaps = []
    for s in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = gradfn.grad(s, i, p)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        snaps.append(snapshot(opt))
    return snaps


def run_oracle(oracle: Oracle, gradfn: GradFn, steps: int, start: int = 0):
    snaps = []
    for s in range(start, start + steps):
        i = 0
        per_group = []
        for g in oracle.groups:
            gr = []
            for p in g.params:
                gr.append(gradfn.grad(s, i, p))
                i += 1
            per_group.append(gr)
        oracle.step(per_group)
        snaps.append(oracle.snapshot())
    return snaps


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------
@dataclass
class Tol:
    rtol: float
    atol_param: float
    atol_rate: float   # absolute tolerance on rates / effective rates
    atol_weight: float


TOL_F64 = Tol(1e-10, 1e-12, 1e-14, 1e-12)
TOL_F32 = Tol(1e-4, 1e-5, 1e-6, 1e-5)  # rates: atol ~1e-4 of lr (rates near 0 by cancellation)


def _close(a, b, rtol, atol, what):
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one side is None ({a is None}, {b is None})"
        return
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def assert_snapshot_close(a, b, tol: Tol, where="", check_eff=True, check_skipped=True,
                          eff_skip=()):
    assert len(a["params"]) == len(b["params"])
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        _close(x, y, tol.rtol, tol.atol_param, f"{where} param[{i}]")
    assert len(a["rates"]) == len(b["rates"]), f"{where}: number of groups"
    for gi, (ra, rb) in enumerate(zip(a["rates"], b["rates"])):
        assert set(ra) == set(rb), f"{where} group {gi}: rate keys {sorted(ra)} vs {sorted(rb)}"
        for k in ra:
            if k == "weights":
                _close(ra[k], rb[k], tol.rtol, tol.atol_weight, f"{where} group {gi} weights")
            elif isinstance(ra[k], list):
                assert len(ra[k]) == len(rb[k]), f"{where} group {gi} {k}: list length"
                for j, (x, y) in enumerate(zip(ra[k], rb[k])):
                    _close(x, y, tol.rtol, tol.atol_rate, f"{where} group {gi} rate {k}[{j}]")
            else:
                _close(ra[k], rb[k], tol.rtol, tol.atol_rate, f"{where} group {gi} rate {k}")
    if check_eff:
        for i, (x, y) in enumerate(zip(a["eff"], b["eff"])):
            if i in eff_skip:
                continue
            if x is None or y is None:
                # only a never-stepped (empty) parameter may lack an effective rate
                other = y if x is None else x
                assert other is None or other.numel() == 0, (
                    f"{where} effective_rate[{i}]: missing on one side")
                continue
            _close(x, y, tol.rtol, tol.atol_rate, f"{where} effective_rate[{i}]")
    if check_skipped:
        assert list(a["skipped"]) == list(b["skipped"]), f"{where}: skipped {a['skipped']} vs {b['skipped']}"


def assert_trajectories_close(ta, tb, tol: Tol, label="", eff_skip_at=None, **kw):
    """``eff_skip_at(step) -> set of parameter indices`` whose effective rate is not compared
    at that step."""
    assert len(ta) == len(tb)
    for s, (a, b) in enumerate(zip(ta, tb)):
        skip = eff_skip_at(s) if eff_skip_at else ()
        assert_snapshot_close(a, b, tol, where=f"{label} step {s}", eff_skip=skip, **kw)


def assert_bitwise_equal_snapshots(ta, tb, label=""):
    for s, (a, b) in enumerate(zip(ta, tb)):
        assert_snapshot_close(a, b, Tol(0.0, 0.0, 0.0, 0.0), where=f"{label} step {s}")


def same_bits(a, b) -> bool:
    """Bit-identical leaves: tensors of one dtype and shape with the same bytes (so -0.0 is
    not 0.0, and a NaN equals itself), other values equal."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.detach().cpu().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)


def state_leaves(obj, prefix=""):
    """A state dict (or a list of parameters) flattened into (path, leaf) pairs."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from state_leaves(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from state_leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def assert_state_unchanged(before, after, counters_grown=0):
    """Every leaf bit-identical, except at most `counters_grown` scalar counters that grew by
    exactly one (a skip counter, wherever a backend keeps it)."""
    la, lb = list(state_leaves(before)), list(state_leaves(after))
    assert [p for p, _ in la] == [p for p, _ in lb], "state dict structure changed"
    diffs = [(p, a, b) for (p, a), (_, b) in zip(la, lb) if not same_bits(a, b)]
    assert len(diffs) <= counters_grown, f"state changed: {[d[0] for d in diffs]}"
    for path, a, b in diffs:
        fa = float(a) if not isinstance(a, torch.Tensor) else float(a.reshape(()))
        fb = float(b) if not isinstance(b, torch.Tensor) else float(b.reshape(()))
        assert fb == fa + 1, f"state changed: {path}: {a} -> {b}"


def max_rel_change(rates0, rates1, level, group=0):
    """Largest |r1 - r0| / |r0| over the rates of ``level`` (a measure that they moved)."""
    r0 = rates0[group][level]
    r1 = rates1[group][level]
    if not isinstance(r0, list):
        r0, r1 = [r0], [r1]
    m = 0.0
    for x, y in zip(r0, r1):
        if x.numel() == 0:
            continue
        m = max(m, float(((y - x).abs() / x.abs().clamp_min(1e-30)).max()))
    return m


def initial_rates(levels, lr, params):
    """The rates() structure at construction, for movement checks."""
    d = {}
    for lv in levels:
        if lv == "global":
            d[lv] = torch.tensor(float(lr), dtype=torch.float64)
        elif lv == "layer":
            d[lv] = [torch.tensor(float(lr), dtype=torch.float64) for _ in params]
        elif lv == "unit":
            d[lv] = [torch.full((n_units(p.shape),), float(lr), dtype=torch.float64) for p in params]
        else:
            d[lv] = [torch.full(p.shape, float(lr), dtype=torch.float64) for p in params]
    return [d]


STEPS = 12


def run_case(case, backend, dtype=torch.float64, steps=STEPS, shapes=DEFAULT_SHAPES,
             device="cpu", seed=0, extra=None):
    """Run a ``cases.Case`` with the optimizer on ``backend``; returns the snapshots."""
    ps = make_params(dtype, device, seed, shapes)
    kw = dict(case.kwargs)
    kw.update(extra or {})
    opt = opt_class(case.cls)(ps, backend=backend, **kw)
    gf = GradFn(shapes, seed, sign=case.sign, noise=case.noise)
    return run_optimizer(opt, gf, steps)


def run_case_oracle(case, steps=STEPS, shapes=DEFAULT_SHAPES, seed=0, extra=None):
    ps = make_params(torch.float64, "cpu", seed, shapes)
    kw = dict(case.kwargs)
    kw.update(extra or {})
    orc = Oracle([dict(params=ps, **kw)], CLASS_KIND[case.cls])
    gf = GradFn(shapes, seed, sign=case.sign, noise=case.noise)
    return run_oracle(orc, gf, steps), orc
