"""Backend registry: every backend is a module with `name`, `unavailable_reason(device)`
and `step(job)` (one param group's step, see `multilevel_hd.state.GroupJob`).

Modules and successful resolutions are cached in plain dicts, so that after the first
(eager) look-up `resolve_backend` and `get` are dictionary reads that torch.compile traces
without a graph break (importlib cannot be traced). The optimizer resolves each group's
backend when the group is added, before any step can run under torch.compile."""
from __future__ import annotations

import importlib

import torch

_MODULES = {
    "reference": "multilevel_hd.reference",
    "torch": "multilevel_hd.backends.torch_backend",
    "triton": "multilevel_hd.backends.triton_backend",
    "cuda": "multilevel_hd.backends.cuda_backend",
    "cpp": "multilevel_hd.backends.cpp_backend",
}
# Backends not built in this version; asking for them says so instead of a KeyError.
# (A backend moves from here to _MODULES when its module lands.)
_PLANNED = ()
# "auto" tries these in order for a device type; the pure-PyTorch backend runs anywhere.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
# torch.optim's implementation flags, mapped onto these backends: `fused=True` asks for
# compiled kernels (one pass over all tensors), `fused=False` or `foreach=False` for plain
# PyTorch operations in a loop over the tensors (torch.optim's for-loop implementation);
# `foreach=True` leaves the choice to "auto" (every backend it picks steps a group's tensors
# together).
FUSED = ("triton", "cuda", "cpp")
UNFUSED = ("torch", "reference")


_LOADED: dict = {}  # name -> imported backend module
_RESOLVED: dict = {}  # (option, device type, device index) -> concrete backend name


def _module(name: str):
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def unavailable_reason(name: str, device: torch.device):
    """None when backend `name` can run on `device`, else a sentence saying why not."""
    if name in _PLANNED:
        return f"backend {name!r} is not part of this multilevel_hd version; use 'torch'"
    return _module(name).unavailable_reason(device)


def available_backends(device) -> list[str]:
    device = torch.device(device)
    return [name for name in _MODULES if unavailable_reason(name, device) is None]


def check_flags(name: str, fused, foreach) -> None:
    """Refuse torch.optim flags that contradict a group's `backend` option."""
    if fused and foreach:  # torch.optim's own error
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and name in UNFUSED:
        raise ValueError(f"fused=True asks for a fused backend ({', '.join(FUSED)}), not backend={name!r}")
    if (fused is False or foreach is False) and name in FUSED:
        flag = "fused" if fused is False else "foreach"
        raise ValueError(f"{flag}=False asks for the 'torch' backend, not backend={name!r}")


def resolve_backend(name: str, device, fused=None, foreach=None) -> str:
    """The concrete backend for a group's `backend` option and torch.optim flags (`fused`,
    `foreach`: see FUSED) on `device` (cached once found: whether a backend can run on a
    device does not change within a process)."""
    device = torch.device(device)
    key = (name, device.type, device.index, fused, foreach)
    found = _RESOLVED.get(key)
    if found is not None:
        return found
    if name == "auto":
        order = _AUTO_ORDER.get(device.type, ("torch",))
        if fused:
            order = tuple(n for n in order if n in FUSED) or FUSED  # (then each says why it cannot run)
        elif fused is False or foreach is False:
            order = ("torch",)
        found = next((n for n in order if unavailable_reason(n, device) is None), None)
        if found is None:  # only fused=True can leave nothing: say why each one cannot run
            reasons = "; ".join(f"{n}: {unavailable_reason(n, device)}" for n in order)
            # worded as torch.optim's own refusal, which PyTorch's optimizer tests match on
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                               f"on a device a fused backend runs on; none can run on {device} ({reasons})")
    else:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
        found = name
    _RESOLVED[key] = found
    return found


def get(name: str):
    return _module(name)
