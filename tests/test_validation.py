"""Bad input gets a clear exception, never a silent wrong result (docs/algorithm.md section 4)."""
import copy

import pytest
import torch

import multilevel_hd as mlhd
from cases import ALL_LEVELS
from conftest import ALL_BACKENDS, DEVICE, FAST_BACKENDS
from trajectory import GradFn, assert_state_unchanged, make_params, run_optimizer

BACKENDS = ["reference"] + FAST_BACKENDS
SGD, ADAM, ADAMW = mlhd.MultiLevelSGD, mlhd.MultiLevelAdam, mlhd.MultiLevelAdamW
NAN, INF = float("nan"), float("inf")

BAD_OPTIONS = [
    # negative lr, hypergrad_lr (float and dict), combination_lr, eps, hd_decay
    ("neg-lr-sgd", SGD, dict(lr=-0.1)),
    ("neg-lr-adam", ADAM, dict(lr=-1e-3)),
    ("neg-beta", SGD, dict(hypergrad_lr=-1e-6)),
    ("neg-beta-adam", ADAMW, dict(hypergrad_lr=-1e-8)),
    ("neg-beta-dict", SGD, dict(hypergrad_lr={"global": 1e-6, "unit": -1e-6})),
    ("neg-beta-mult", ADAM, dict(hypergrad_rule="multiplicative", hypergrad_lr=-0.01)),
    ("neg-combination-lr", SGD, dict(combination_lr=-0.01)),
    ("neg-combination-lr-adam", ADAM, dict(combination_lr=-1.0)),
    ("neg-eps", ADAM, dict(eps=-1e-8)),
    ("neg-eps-adamw", ADAMW, dict(eps=-1.0)),
    ("neg-hd-decay", SGD, dict(hd_decay=-0.001)),
    ("neg-hd-decay-adam", ADAM, dict(hd_decay=-1.0)),
    # multiplicative beta >= 1
    ("mult-beta-1", SGD, dict(hypergrad_rule="multiplicative", hypergrad_lr=1.0)),
    ("mult-beta-2", ADAM, dict(hypergrad_rule="multiplicative", hypergrad_lr=2.5)),
    ("mult-beta-dict", SGD, dict(hypergrad_rule="multiplicative",
                                 hypergrad_lr={"global": 0.1, "unit": 1.0})),
    # unknown rule / scaling
    ("rule", SGD, dict(hypergrad_rule="exponential")),
    ("rule-adam", ADAM, dict(hypergrad_rule="Additive ")),
    ("scaling", SGD, dict(hypergrad_scaling="sqrt")),
    ("scaling-adam", ADAM, dict(hypergrad_scaling=None)),
    # betas outside [0, 1)
    ("beta1-1", ADAM, dict(betas=(1.0, 0.999))),
    ("beta2-1", ADAM, dict(betas=(0.9, 1.0))),
    ("beta1-neg", ADAMW, dict(betas=(-0.1, 0.999))),
    ("beta2-neg", ADAM, dict(betas=(0.9, -0.5))),
    ("beta2-big", ADAMW, dict(betas=(0.9, 1.5))),
    # nesterov without momentum
    ("nesterov", SGD, dict(nesterov=True)),
    ("nesterov-zero", SGD, dict(momentum=0.0, nesterov=True)),
    # shrinkage rho outside [0, 1)
    ("rho-neg", SGD, dict(levels=ALL_LEVELS, shrinkage={"param": -0.1})),
    ("rho-1", ADAM, dict(levels=ALL_LEVELS, shrinkage={"unit": 1.0})),
    ("rho-big", SGD, dict(levels=ALL_LEVELS, shrinkage={"layer": 0.5, "param": 1.5})),
    # levels: unknown, duplicate, empty
    ("levels-unknown", SGD, dict(levels=("global", "neuron"))),
    ("levels-unknown-adam", ADAM, dict(levels=("Global",))),
    ("levels-dup", SGD, dict(levels=("global", "unit", "global"))),
    ("levels-dup-adam", ADAM, dict(levels=("param", "param"))),
    ("levels-empty", SGD, dict(levels=())),
    ("levels-empty-list", ADAM, dict(levels=[])),
    # init_weights: wrong length, negative, zero sum
    ("iw-short", SGD, dict(init_weights=(1.0,))),
    ("iw-long", ADAM, dict(init_weights=(0.5, 0.3, 0.2))),
    ("iw-long-all", SGD, dict(levels=ALL_LEVELS, init_weights=(1, 1, 1))),
    ("iw-negative", SGD, dict(init_weights=(1.2, -0.2))),
    ("iw-negative-adam", ADAM, dict(levels=ALL_LEVELS, init_weights=(1, 1, -1, 1))),
    ("iw-zero-sum", SGD, dict(init_weights=(0.0, 0.0))),
    ("iw-zero-sum-adam", ADAMW, dict(levels=("layer", "param", "unit"), init_weights=(0, 0, 0))),
    # NaN or infinite options (a NaN rate bound: NaN rates on some backends, no bound on others)
    ("lr-inf", SGD, dict(lr=INF)),
    ("lr-nan", ADAM, dict(lr=NAN)),
    ("beta-inf", SGD, dict(hypergrad_lr=INF)),
    ("beta-dict-nan", ADAM, dict(hypergrad_lr={"global": 1e-8, "unit": NAN})),
    ("combination-lr-inf", SGD, dict(combination_lr=INF)),
    ("iw-inf", SGD, dict(init_weights=(INF, 1.0))),
    ("iw-nan", ADAM, dict(init_weights=(NAN, 1.0))),
    ("bounds-nan", SGD, dict(rate_bounds=(NAN, None))),
    ("bounds-inf", ADAM, dict(rate_bounds=(0.0, INF))),
    ("eps-inf", ADAM, dict(eps=INF)),
    ("betas-nan", ADAMW, dict(betas=(0.9, NAN))),
    ("weight-decay-inf", ADAMW, dict(weight_decay=INF)),
    ("hd-decay-inf", SGD, dict(hd_decay=INF)),
    ("final-lr-nan", SGD, dict(final_lr=NAN)),
    ("momentum-inf", SGD, dict(momentum=INF)),
    ("dampening-nan", SGD, dict(momentum=0.9, dampening=NAN)),
    ("rho-nan", ADAM, dict(levels=ALL_LEVELS, shrinkage={"unit": NAN})),
    # per-level entries for a level that is not active (they would be ignored without a word)
    ("beta-dict-inactive", SGD, dict(hypergrad_lr={"global": 1e-6, "param": 1e-6})),
    ("shrinkage-inactive", ADAM, dict(shrinkage={"param": 0.1})),
    ("shrinkage-inactive-layer", SGD, dict(levels=("global", "unit", "param"), shrinkage={"layer": 0.1})),
    # unknown backend name
    ("backend-unknown", SGD, dict(backend="numpy")),
    ("backend-unknown-adam", ADAM, dict(backend="Torch")),
]

# options of the wrong type: TypeError at construction, as torch.optim's comparisons raise
BAD_TYPES = [
    ("bounds-string", SGD, dict(rate_bounds=("a", None))),
    ("bounds-number", ADAM, dict(rate_bounds=0.1)),
    ("lr-string", SGD, dict(lr="0.1")),
    ("beta-string", SGD, dict(hypergrad_lr="1e-6")),
    ("beta-dict-string", ADAM, dict(hypergrad_lr={"global": "1e-8"})),
    ("combination-lr-string", SGD, dict(combination_lr="0.01")),
    ("iw-string", SGD, dict(init_weights=("0.8", 0.2))),
    ("betas-string", ADAM, dict(betas=("0.9", 0.999))),
    ("eps-none", ADAMW, dict(eps=None)),
    ("momentum-string", SGD, dict(momentum="0.9")),
    ("weight-decay-list", ADAM, dict(weight_decay=[0.1])),
    ("hd-decay-string", SGD, dict(hd_decay="0.1")),
    ("final-lr-string", ADAM, dict(final_lr="0.01")),
    ("shrinkage-list", SGD, dict(levels=ALL_LEVELS, shrinkage=[("param", 0.1)])),
    ("rho-string", ADAM, dict(levels=ALL_LEVELS, shrinkage={"param": "0.1"})),
]


@pytest.mark.parametrize("name,cls,kw", BAD_OPTIONS, ids=[b[0] for b in BAD_OPTIONS])
def test_bad_option_raises_value_error(name, cls, kw):
    kw = dict(kw)
    kw.setdefault("backend", "reference")
    with pytest.raises(ValueError):
        cls(make_params(torch.float32), **kw)


@pytest.mark.parametrize("name,cls,kw", BAD_TYPES, ids=[b[0] for b in BAD_TYPES])
def test_bad_option_type_raises_type_error(name, cls, kw):
    with pytest.raises(TypeError):
        cls(make_params(torch.float32), backend="reference", **kw)


@pytest.mark.parametrize("name,cls,kw", [b for b in BAD_OPTIONS if "backend" not in b[2]],
                         ids=[b[0] for b in BAD_OPTIONS if "backend" not in b[2]])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bad_option_raises_value_error_fast_backend(backend, name, cls, kw):
    with pytest.raises(ValueError):
        cls(make_params(torch.float32, DEVICE), backend=backend, **kw)


@pytest.mark.parametrize("name,cls,kw", [b for b in BAD_OPTIONS if "backend" not in b[2]][::3],
                         ids=[b[0] for b in BAD_OPTIONS if "backend" not in b[2]][::3])
def test_bad_option_in_param_group_raises(name, cls, kw):
    """Every option may be set per group, so a bad per-group value is caught too."""
    ps = make_params(torch.float32)
    with pytest.raises(ValueError):
        cls([dict(params=ps[:3]), dict(params=ps[3:], **kw)], backend="reference")
    opt = cls(ps[:3], backend="reference")
    with pytest.raises(ValueError):
        opt.add_param_group(dict(params=ps[3:], **kw))


@pytest.mark.parametrize("name,cls,kw", BAD_OPTIONS + BAD_TYPES, ids=[b[0] for b in BAD_OPTIONS + BAD_TYPES])
def test_bad_option_changes_nothing(name, cls, kw):
    """A bad option raises where it enters, at add_param_group or set on a group between
    steps, before anything changes: the same groups, the same state, the same parameters.
    (The last option of a case is the bad one; those before it are its context.)"""
    ps = make_params(torch.float32)
    gf = GradFn()
    *context, (key, value) = kw.items()
    opt = cls([dict(params=ps[:3])], backend="reference", **dict(context))
    run_optimizer(opt, gf, 2)
    before = copy.deepcopy((opt.state_dict(), ps))

    with pytest.raises((ValueError, TypeError)):
        opt.add_param_group(dict(params=ps[3:], **kw))
    assert len(opt.param_groups) == 1
    assert_state_unchanged(before, (opt.state_dict(), ps))

    group = opt.param_groups[0]
    good, group[key] = group[key], value
    for i, p in enumerate(ps):
        p.grad = gf.grad(2, i, p)
    with pytest.raises((ValueError, TypeError)):
        opt.step()
    group[key] = good
    assert_state_unchanged(before, (opt.state_dict(), ps))


def test_good_edge_values_accepted():
    """Boundaries that are allowed: betas 0, rho 0, hypergrad_lr 0, multiplicative beta < 1,
    every level order, unnormalised init weights."""
    ps = make_params(torch.float32)
    ADAM(ps, betas=(0.0, 0.0), backend="reference")
    SGD(ps, levels=ALL_LEVELS, shrinkage={"param": 0.0, "unit": 0.99}, backend="reference")
    SGD(ps, hypergrad_lr=0.0, combination_lr=0.0, hd_decay=0.0, backend="reference")
    SGD(ps, hypergrad_rule="multiplicative", hypergrad_lr=0.999, backend="reference")
    SGD(ps, levels=("param", "global", "layer"), init_weights=(0, 5, 1), backend="reference")
    SGD(ps, lr=0.0, backend="reference")
    SGD(ps, momentum=0.9, nesterov=True, backend="reference")


@pytest.mark.parametrize("name", ["triton", "cuda", "cpp"])
def test_backend_that_cannot_run_raises_runtime_error(name):
    """docs/algorithm.md section 4: asking for a backend that cannot run raises a RuntimeError that says why."""
    if name in ALL_BACKENDS:  # (FAST_BACKENDS may be narrowed by MLHD_TEST_BACKENDS)
        pytest.skip(f"{name} runs on {DEVICE}")
    ps = make_params(torch.float32, DEVICE)
    with pytest.raises(RuntimeError) as info:
        opt = SGD(ps, backend=name)
        run_optimizer(opt, GradFn(), 1)
    assert len(str(info.value)) > 20


@pytest.mark.parametrize("cls", [SGD, ADAM])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_raises_at_step(backend, cls):
    p = torch.randn(6, 4, device=DEVICE if backend != "reference" else "cpu", requires_grad=True)
    q = torch.randn(3, device=p.device, requires_grad=True)
    opt = cls([p, q], backend=backend)
    idx = torch.tensor([[0, 2], [1, 3]])
    p.grad = torch.sparse_coo_tensor(idx, torch.tensor([1.0, 2.0]), (6, 4),
                                     check_invariants=True).to(p.device)
    q.grad = torch.ones_like(q)
    before = (p.detach().clone(), q.detach().clone())
    with pytest.raises((RuntimeError, ValueError)):
        opt.step()
    assert torch.equal(p.detach(), before[0])


@pytest.mark.parametrize("cls", [SGD, ADAM, ADAMW])
@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_params_raise(backend, cls):
    dev = DEVICE if backend != "reference" else "cpu"
    p = torch.randn(4, 3, dtype=torch.complex64, device=dev, requires_grad=True)
    with pytest.raises((ValueError, TypeError)):
        opt = cls([torch.randn(3, device=dev, requires_grad=True), p], backend=backend)
        p.grad = torch.ones_like(p)
        opt.step()


# ------------------------------------------------------------------------------------------
# Not listed in docs/algorithm.md section 4, but what a PyTorch user expects (torch.optim raises for these; a typo
# in a level name inside a dict would otherwise be silently ignored).
# ------------------------------------------------------------------------------------------
TORCH_PARITY = [
    ("neg-momentum", SGD, dict(momentum=-0.9)),
    ("neg-weight-decay-sgd", SGD, dict(weight_decay=-0.1)),
    ("neg-weight-decay-adam", ADAM, dict(weight_decay=-0.1)),
    ("beta-dict-unknown-level", SGD, dict(hypergrad_lr={"global": 1e-6, "unit": 1e-6, "neuron": 1e-6})),
    ("shrinkage-unknown-level", SGD, dict(shrinkage={"units": 0.1})),
]


@pytest.mark.parametrize("name,cls,kw", TORCH_PARITY, ids=[b[0] for b in TORCH_PARITY])
def test_pytorch_parity_bad_options_raise(name, cls, kw):
    with pytest.raises(ValueError):
        cls(make_params(torch.float32), backend="reference", **kw)
