"""What the benchmark times: optimizer configurations x implementations, on the same shapes.

A `Candidate` is one row of the report and one pytest-benchmark case: a configuration (the
paper's ResNet hyper-parameters) with a multilevel_hd backend or a torch.optim implementation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import traffic
from .shapes import Shape, numel

MLHD_BACKENDS = ("reference", "torch", "cpp", "triton", "cuda")
TORCH_IMPLS = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
# The reference backend is a per-tensor oracle, far too slow to time on a real network.
REFERENCE_MAX_NUMEL = 1_000_000


@dataclass(frozen=True)
class Config:
    key: str  # short name for test ids
    label: str  # the report's "optimizer" column
    family: str  # base optimizer: "adam" or "sgd"
    opts: dict = field(compare=False)  # `key` identifies a config; a dict cannot be hashed
    levels: tuple[str, ...] | None = None  # multilevel_hd levels; None means torch.optim


# Paper, Table 1 (ResNets on CIFAR-10): Adam lr 1e-3, SGD with Nesterov momentum 0.9 lr 0.1;
# everything else at multilevel_hd's defaults. Values do not change the work a step does; the
# levels, the base optimizer and its momentum do.
_ADAM = {"lr": 1e-3}
_SGDN = {"lr": 0.1, "momentum": 0.9, "nesterov": True}

MLHD_ADAM = Config("mlhd-adam", "MultiLevelAdam [global+unit]", "adam", _ADAM, ("global", "unit"))
MLHD_ADAM_3 = Config(  # the paper's 3-level feed-forward setting, the one with a param level
    "mlhd-adam3", "MultiLevelAdam [global+layer+param]", "adam",
    {**_ADAM, "init_weights": (0.4, 0.3, 0.3)}, ("global", "layer", "param"),
)
MLHD_SGDN = Config(
    "mlhd-sgdn", "MultiLevelSGD nesterov [global+unit]", "sgd", _SGDN, ("global", "unit"),
)
MLHD_AMSGRAD = Config(  # a third state tensor, vmax, read by both passes
    "mlhd-amsgrad", "MultiLevelAdam amsgrad [global+unit]", "adam", {**_ADAM, "amsgrad": True}, ("global", "unit"),
)
ADAM = Config("adam", "Adam", "adam", _ADAM)
SGDN = Config("sgdn", "SGD nesterov", "sgd", _SGDN)
AMSGRAD = Config("amsgrad", "Adam amsgrad", "adam", {**_ADAM, "amsgrad": True})
CONFIGS = (MLHD_ADAM, MLHD_ADAM_3, MLHD_SGDN, MLHD_AMSGRAD, ADAM, SGDN, AMSGRAD)
# torch.optim rows are compared with the multilevel_hd configuration on the same base optimizer.
_MLHD_COUNTERPART = {ADAM.key: MLHD_ADAM, SGDN.key: MLHD_SGDN, AMSGRAD.key: MLHD_AMSGRAD}


@functools.cache
def _mlhd_backends(device: str) -> tuple[str, ...] | str:
    """multilevel_hd's runnable backends on `device`, or why the package cannot be used."""
    try:
        from multilevel_hd.backends import available_backends
    except ImportError as err:
        return f"multilevel_hd is not importable: {err}"
    return tuple(available_backends(torch.device(device)))


@dataclass(frozen=True)
class Candidate:
    config: Config
    backend: str  # a multilevel_hd backend, or a key of TORCH_IMPLS
    compiled: bool = False  # step() under torch.compile (only for the torch backend)

    @property
    def id(self) -> str:
        return f"{self.config.key}-{self.backend}" + ("-compiled" if self.compiled else "")

    @property
    def label(self) -> str:
        """The report's "backend" column."""
        return f"{self.backend} (torch.compile)" if self.compiled else self.backend

    @property
    def is_mlhd(self) -> bool:
        return self.config.levels is not None

    def build(self, params) -> torch.optim.Optimizer:
        cfg = self.config
        if not self.is_mlhd:
            cls = torch.optim.Adam if cfg.family == "adam" else torch.optim.SGD
            return cls(params, **cfg.opts, **TORCH_IMPLS[self.backend])
        import multilevel_hd

        cls = multilevel_hd.MultiLevelAdam if cfg.family == "adam" else multilevel_hd.MultiLevelSGD
        return cls(params, **cfg.opts, levels=cfg.levels, backend=self.backend)

    def unavailable_reason(self, shapes: list[Shape], device: torch.device) -> str | None:
        if not self.is_mlhd:
            try:  # torch.optim says itself which implementations a device supports
                self.build([torch.zeros(1, device=device, requires_grad=True)])
            except (RuntimeError, ValueError) as err:
                return f"torch.optim {self.backend} on {device}: {err}"
            return None
        if self.backend == "reference" and numel(shapes) > REFERENCE_MAX_NUMEL:
            return "the reference backend is a slow oracle, timed on small models only"
        backends = _mlhd_backends(str(device))
        if isinstance(backends, str):
            return backends
        if self.backend not in backends:
            return f"backend {self.backend!r} not available on {device}"
        return None

    def min_bytes(self, shapes: list[Shape], dtype: torch.dtype) -> int:
        cfg = self.config
        return traffic.min_bytes(cfg.family, cfg.opts, cfg.levels, shapes, dtype)

    def baseline(self) -> Candidate:
        """The multilevel_hd `torch` backend row this candidate's time is divided by."""
        return Candidate(_MLHD_COUNTERPART.get(self.config.key, self.config), "torch")


ALL_CANDIDATES = tuple(
    Candidate(cfg, backend)
    for cfg in CONFIGS
    for backend in (MLHD_BACKENDS if cfg.levels is not None else TORCH_IMPLS)
)
ADAM_FUSED = Candidate(ADAM, "fused")
# The report also times these split into their stages (bench/stages.py), beside the floor of a
# MultiLevelAdam step.
STAGED = (Candidate(MLHD_ADAM, "cpp"), Candidate(MLHD_ADAM_3, "cpp"))
# Not in ALL_CANDIDATES: compiling a ResNet's step takes long (Inductor), so only
# `python -m bench.report --compile` times it.
MLHD_ADAM_COMPILED = Candidate(MLHD_ADAM, "torch", compiled=True)


class Live:
    """One candidate's optimizer on its own copy of the parameters.

    Gradients alternate between shared sets (optimizers only read them): with one fixed
    gradient every hyper-gradient g * u_prev would be positive and the rates would grow
    without bound; independent draws give sums of random sign, as minibatch noise does.
    Handing `.grad` a different tensor each step is also what `zero_grad(set_to_none=True)`
    followed by `backward()` does.
    """

    def __init__(self, candidate: Candidate, params, grad_sets):
        self.params = [p.detach().clone().requires_grad_() for p in params]
        self.optimizer = candidate.build(self.params)
        # The torch backend's step() traces into one graph (README, "torch.compile"); it is
        # compiled at the first call, i.e. in the untimed warm-up rounds.
        self._step = torch.compile(self.optimizer.step) if candidate.compiled else self.optimizer.step
        self._grad_sets = grad_sets
        self._steps = 0

    def feed(self) -> None:
        grads = self._grad_sets[self._steps % len(self._grad_sets)]
        self._steps += 1
        for p, g in zip(self.params, grads):
            p.grad = g

    def step(self) -> None:
        self._step()
