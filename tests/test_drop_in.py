"""A drop-in for torch.optim (SPEC 4, README "A drop-in for torch.optim"): every keyword of the
torch.optim twin, which backend runs, a tensor lr, deepcopy and pickle, a warm start from the
twin's state dict."""
from __future__ import annotations

import inspect

import pytest
import torch

import multilevel_hd as mlhd
from conftest import ALL_BACKENDS
from multilevel_hd import backends

TWINS = {mlhd.MultiLevelSGD: torch.optim.SGD, mlhd.MultiLevelAdam: torch.optim.Adam,
         mlhd.MultiLevelAdamW: torch.optim.AdamW}


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))]


# -- every keyword of the twin ---------------------------------------------------------------
@pytest.mark.parametrize("cls", list(TWINS), ids=lambda c: c.__name__)
def test_every_keyword_of_the_twin_is_accepted(cls):
    """Each keyword of torch.optim's signature, with the twin's default and with another value
    torch.optim accepts (differentiable only False: see below), lands in the group options."""
    twin = inspect.signature(TWINS[cls]).parameters
    names = [n for n in twin if n != "params"]
    ours = inspect.signature(cls).parameters
    assert not [n for n in names if n not in ours and "kwargs" not in ours], names
    other = dict(foreach=True, fused=False, capturable=True, amsgrad=True, maximize=True, nesterov=True,
                 momentum=0.9, decoupled_weight_decay=True, weight_decay=0.1, lr=0.01)
    for values in ({n: twin[n].default for n in names},
                   {n: other.get(n, twin[n].default) for n in names if n != "fused"}):
        opt = cls(_params(), **values)
        group = opt.param_groups[0]
        for n, v in values.items():
            assert group[n] == v, n


@pytest.mark.parametrize("cls", list(TWINS), ids=lambda c: c.__name__)
def test_positional_arguments_as_the_twin(cls):
    """torch.optim.Adam/AdamW take amsgrad sixth; SGD's first four are the twin's."""
    if cls is mlhd.MultiLevelSGD:
        opt = cls(_params(), 0.05, 0.9, 0.1)
        assert [opt.defaults[k] for k in ("lr", "momentum", "dampening")] == [0.05, 0.9, 0.1]
    else:
        opt = cls(_params(), 0.01, (0.8, 0.9), 1e-6, 0.2, True)
        assert [opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")] == [
            0.01, (0.8, 0.9), 1e-6, 0.2, True]


def test_differentiable_raises_not_implemented():
    for cls in TWINS:
        with pytest.raises(NotImplementedError, match="differentiable=True"):
            cls(_params(), differentiable=True)
    opt = mlhd.MultiLevelAdam(_params())
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.ones(2))], differentiable=True))
    assert len(opt.param_groups) == 1


CPU_AUTO = "cpp" if "cpp" in ALL_BACKENDS else "torch"


@pytest.mark.parametrize("flags,expected", [
    (dict(), CPU_AUTO),
    (dict(foreach=True), CPU_AUTO),
    (dict(foreach=None, fused=None), CPU_AUTO),
    (dict(foreach=False), "torch"),
    (dict(fused=False), "torch"),
    (dict(fused=True), "cpp"),
], ids=str)
def test_fused_and_foreach_choose_the_backend(flags, expected):
    """auto resolves with torch.optim's flags in mind (README: fused=True a fused backend,
    fused=False / foreach=False the torch backend); the step runs that backend."""
    if expected == "cpp" and "cpp" not in ALL_BACKENDS:
        with pytest.raises(RuntimeError, match="fused=True"):
            mlhd.MultiLevelAdam(_params(), **flags).backends()
        return
    ps = _params()
    opt = mlhd.MultiLevelAdam(ps, **flags)
    assert opt.backends() == [expected]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt._backends[0].name == expected


@pytest.mark.parametrize("backend,flags,error", [
    ("torch", dict(fused=True), ValueError),
    ("reference", dict(fused=True), ValueError),
    ("cpp", dict(fused=False), ValueError),
    ("cpp", dict(foreach=False), ValueError),
    ("auto", dict(fused=True, foreach=True), RuntimeError),  # torch.optim's own error
], ids=str)
def test_contradicting_flags_raise(backend, flags, error):
    with pytest.raises(error, match="fused|foreach"):
        mlhd.MultiLevelSGD(_params(), backend=backend, **flags)


def test_fused_true_accepts_a_named_fused_backend_and_foreach_true_any():
    assert mlhd.MultiLevelAdam(_params(), backend="torch", foreach=True).backends() == ["torch"]
    if "cpp" in ALL_BACKENDS:
        assert mlhd.MultiLevelAdam(_params(), backend="cpp", fused=True).backends() == ["cpp"]


# -- which backend runs -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto"] + ALL_BACKENDS)
def test_backends_and_repr_name_each_groups_backend(backend):
    """backend="auto" used to resolve silently (the group still says "auto"): backends() and
    repr() name what runs, per group (here a second group asks for the torch backend)."""
    expected = backends.resolve_backend(backend, "cpu")
    opt = mlhd.MultiLevelSGD([dict(params=_params()), dict(params=_params(), backend="torch")],
                             backend=backend)
    assert opt.backends() == [expected, "torch"]
    text = repr(opt)
    assert text.count("resolved backend:") == 2
    assert f"resolved backend: {expected}\n" in text and text.endswith("resolved backend: torch\n)")
    assert "Parameter Group 1" in text and "    momentum: 0.0" in text  # torch.optim's listing


def test_repr_of_a_backend_that_cannot_run_says_why():
    opt = mlhd.MultiLevelSGD([torch.nn.Parameter(torch.empty(3, device="meta"))], backend="cpp")
    assert "resolved backend: none (backend 'cpp' cannot run on meta" in repr(opt)
    with pytest.raises(RuntimeError, match="cannot run on meta"):
        opt.backends()
