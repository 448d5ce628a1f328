"""The level structure of one param group: units, layers, row lengths, offsets, N_k.

This module is the only place that knows how a tensor splits into units (docs/algorithm.md section 1):
unit j of a tensor shaped (n0, ...) is the logical slice p[j], so a tensor has n0 units of
numel / n0 elements each (a 0-d tensor has one unit of one element). Rates of the
"layer" and "unit" levels live in flat per-group arrays (one entry per tensor, one entry
per unit) laid out in the group's parameter order; the plan says where each tensor's
entries sit. Backends share this metadata; none of them recomputes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

LEVELS = ("global", "layer", "unit", "param")  # coarse to fine: the parent order of shrinkage


@dataclass(frozen=True)
class TensorLayout:
    """Where one parameter tensor sits in its group's flat level arrays."""

    numel: int
    units: int  # n0: the number of dim-0 slices (1 for a 0-d tensor)
    row_len: int  # elements per unit: numel / units (N_unit for this tensor's units)
    unit_offset: int  # index of the tensor's first unit in the group's flat unit array
    layer: int  # index of the tensor in the group's flat layer array
    layer_size: int  # N_layer: the whole tensor's numel (more than `numel` for a shard, see fsdp.py)


def tensor_units(p: torch.Tensor) -> int:
    return p.shape[0] if p.dim() > 0 else 1


def unit_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape under which one value per unit broadcasts against p: (n0, 1, ..., 1)."""
    return (p.shape[0],) + (1,) * (p.dim() - 1) if p.dim() else ()


def unit_view(per_unit: torch.Tensor, t: "TensorLayout", p: torch.Tensor) -> torch.Tensor:
    """p's slice of a group's per-unit array, shaped to broadcast against p."""
    return per_unit[t.unit_offset : t.unit_offset + t.units].view(unit_shape(p))


@dataclass
class GroupLayout:
    """Static layout of all parameters of a param group (fixed when the group is added)."""

    tensors: tuple[TensorLayout, ...]
    num_units: int

    @classmethod
    def of(cls, params, layer_sizes=None) -> "GroupLayout":
        """The layout of `params`; `layer_sizes`: each tensor's N_layer when the tensors are
        dim-0 shards of larger ones (default: their own numel)."""
        tensors, offset = [], 0
        for layer, p in enumerate(params):
            units = tensor_units(p)
            row_len = p.numel() // units if units else 0
            size = p.numel() if layer_sizes is None else layer_sizes[layer]
            tensors.append(TensorLayout(p.numel(), units, row_len, offset, layer, size))
            offset += units
        return cls(tuple(tensors), offset)

    @property
    def num_layers(self) -> int:
        return len(self.tensors)


@dataclass
class StepPlan:
    """The part of a step's structure that depends on which parameters have gradients.

    Built once per (group, set of parameters with gradients) and cached by the optimizer:
    `active` lists the indices (in group order) of the parameters that take part in this
    step; N is the number of their elements. Device tensors derived from the plan (masks,
    per-unit sizes, a backend's launch tables) are made once per plan through `cached`.
    `layers`: the tensors whose layer rates move, when more than `active` (a shard without
    rows on this rank still steps its tensor's layer rate, see fsdp.py).
    """

    layout: GroupLayout
    active: tuple[int, ...]
    layers: tuple[int, ...] | None = None
    num_elements: int = field(init=False)
    _device_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.num_elements = sum(self.layout.tensors[i].numel for i in self.active)
        if self.layers is None:
            self.layers = self.active

    @property
    def active_layouts(self) -> list[TensorLayout]:
        return [self.layout.tensors[i] for i in self.active]

    def level_sizes(self, level: str) -> list[int]:
        """N_k[j] for every j of `level` over the whole group (inactive entries included)."""
        if level == "global":
            return [self.num_elements]
        if level == "layer":
            return [t.layer_size for t in self.layout.tensors]
        if level == "unit":
            return [t.row_len for t in self.layout.tensors for _ in range(t.units)]
        raise ValueError(f"level {level!r} has one entry per element, not a size table")

    def cached(self, key, make):
        """The value for `key` (device tables, masks, launch tables of a backend), made once per plan."""
        if key not in self._device_cache:
            self._device_cache[key] = make()
        return self._device_cache[key]

    def prepare(self, device, dtype) -> None:
        """Make the level stage's device tables now. The optimizer calls this when it makes
        the plan, outside any torch.compile'd code, so that a compiled step reads them as
        inputs instead of creating them inside its graph (and recompiling at the next call)."""
        self.unit_mask(device, dtype)
        self.layer_mask(device, dtype)
        for level in ("layer", "unit"):
            self.moves(level, device)
            self.size_scale(level, device, dtype)
            self.sizes(level, device, dtype)
        self.zero(device, dtype)
        self.units_per_layer(device)
        self.first_units(device)
        self.layer_of_unit(device)

    def unit_mask(self, device, dtype) -> torch.Tensor:
        """1 for the units of tensors that step, 0 for the others (their rates must not move)."""

        def make():
            mask = torch.zeros(self.layout.num_units, dtype=dtype)
            for t in self.active_layouts:
                mask[t.unit_offset : t.unit_offset + t.units] = 1
            return mask.to(device)

        return self.cached(("unit_mask", device, dtype), make)

    def layer_mask(self, device, dtype) -> torch.Tensor:
        def make():
            mask = torch.zeros(self.layout.num_layers, dtype=dtype)
            mask[list(self.layers)] = 1
            return mask.to(device)

        return self.cached(("layer_mask", device, dtype), make)

    def moves(self, level: str, device):
        """Which rates of the coarse `level` a step may move (a bool mask: those of the
        tensors that step), or None when all of them may (then no mask is applied)."""

        def make():
            if level == "layer":
                return None if len(self.layers) == self.layout.num_layers else self.layer_mask(device, torch.bool)
            resting = set(range(self.layout.num_layers)) - set(self.active)
            return self.unit_mask(device, torch.bool) if any(self.layout.tensors[j].units for j in resting) else None

        return None if level == "global" else self.cached(("moves", level, device), make)

    def zero(self, device, dtype) -> torch.Tensor:
        """0 as a 0-d device tensor, for selects (`torch.where(c, x, 0.0)` makes one at every call)."""
        return self.cached(("zero", device, dtype), lambda: torch.zeros((), dtype=dtype, device=device))

    def sizes(self, level: str, device, dtype) -> torch.Tensor:
        """N_k[j] of `level` as a device tensor."""
        return self.cached(("sizes", level, device, dtype),
                           lambda: torch.tensor(self.level_sizes(level), dtype=dtype, device=device))

    def size_scale(self, level: str, device, dtype) -> torch.Tensor:
        """N / N_k[j] for `hypergrad_scaling="size"` (0 where N_k[j] is 0: nothing to update)."""

        def make():
            sizes = torch.tensor(self.level_sizes(level), dtype=torch.float64)
            scale = torch.where(sizes > 0, self.num_elements / sizes.clamp(min=1), 0.0)
            return scale.to(device=device, dtype=dtype)

        return self.cached(("size_scale", level, device, dtype), make)

    def units_per_layer(self, device) -> torch.Tensor:
        """Lengths for segment sums of the flat unit array into layers."""
        return self.cached(
            ("units_per_layer", device),
            lambda: torch.tensor([t.units for t in self.layout.tensors], device=device),
        )

    def first_units(self, device) -> torch.Tensor:
        """Each layer's first unit in the flat unit array, then the number of units: the
        bounds of the layers for the compiled level stage."""
        return self.cached(
            ("first_units", device),
            lambda: torch.tensor([t.unit_offset for t in self.layout.tensors] + [self.layout.num_units], device=device),
        )

    def layer_of_unit(self, device) -> torch.Tensor:
        """For each unit of the flat unit array, the index of its tensor (layer)."""
        return self.cached(
            ("layer_of_unit", device),
            lambda: torch.repeat_interleave(  # output_size: a static shape for torch.compile
                torch.arange(self.layout.num_layers), torch.tensor([t.units for t in self.layout.tensors]),
                output_size=self.layout.num_units,
            ).to(device),
        )
