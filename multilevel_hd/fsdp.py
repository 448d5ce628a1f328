"""FSDP2 (`torch.distributed.fsdp.fully_shard`): param groups of DTensor parameters.

FSDP2 makes each parameter a DTensor sharded along dim 0 over a device mesh (placement
`Shard(0)`; the last ranks' shards may be shorter, or empty). Dim 0 is where this
package's units are, so a rank holds whole units: it steps its local shards with any
backend, its unit and param sums stay local, and only the sums that span rows of several
ranks are all-reduced over the mesh: the layers' sums and the group-level ones
(`levels._group_totals`), in one collective per param group and step. A `Replicate` mesh
dimension (HSDP's) holds copies: nothing is reduced over it.

Per-parameter state is made from the parameters, so it is DTensors shaped like them, as
torch.optim's is under FSDP2 (torch.distributed.checkpoint saves and loads it); the
backends read and write their local tensors. The group state (t, weights, the global and
layer rates) is the same on every rank; its unit rates are this rank's rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .hierarchy import GroupLayout
from .levels import UnitSums, update_levels
from .state import GroupJob

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without torch.distributed has no DTensor parameters
    DTensor = None


@dataclass(frozen=True)
class RowSharding:
    """How a param group's DTensor parameters are spread: `group` is the process group of
    the mesh dimension their rows are sharded over (None: every dimension replicates)."""

    group: Any


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The part of `t` this rank holds: a DTensor's local tensor (its in-place updates are
    the DTensor's), a plain tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def local_state(state: dict) -> dict:
    return {key: local(value) for key, value in state.items()}


def layout_of(params) -> GroupLayout:
    """The group's layout as this rank holds it: units and elements of the local shards,
    each layer's N_layer the whole tensor's numel."""
    return GroupLayout.of([local(p) for p in params], [p.numel() for p in params])


def row_sharding(params, index: int) -> RowSharding | None:
    """None for a group of plain tensors; for DTensor parameters, where their rows are.
    Raises ValueError, naming the parameter, for any layout whose units are not whole on
    each rank or whose sums this module cannot reduce."""
    dtensors = [is_dtensor(p) for p in params]
    if not any(dtensors):
        return None
    if not all(dtensors):
        raise ValueError(
            f"param group {index} mixes DTensor parameters (FSDP2) with plain tensors; the level sums "
            "span the group, so put the plain tensors in a param group of their own"
        )
    mesh, sharded_dims = params[0].device_mesh, None
    for j, p in enumerate(params):
        dims = []
        for dim, placement in enumerate(p.placements):
            if type(placement) is Shard and placement.dim == 0:
                dims.append(dim)
            elif not isinstance(placement, Replicate):
                raise ValueError(
                    f"parameter {j} of param group {index} (shape {tuple(p.shape)}) has placement {placement} "
                    f"(placements {tuple(p.placements)}): multilevel_hd steps DTensor parameters sharded along "
                    "dim 0 (Shard(0), as fully_shard makes them) or replicated, where each rank holds whole units"
                )
        if len(dims) > 1:
            raise ValueError(
                f"parameter {j} of param group {index} is sharded along dim 0 over several mesh dimensions "
                f"{tuple(p.placements)}; multilevel_hd reduces its sums over one"
            )
        if p.device_mesh != mesh or (sharded_dims is not None and dims != sharded_dims):
            raise ValueError(
                f"the parameters of param group {index} are not all sharded alike over one device mesh "
                f"(parameter {j}: placements {tuple(p.placements)}); the level sums span the group"
            )
        sharded_dims = dims
    return RowSharding(mesh.get_group(sharded_dims[0]) if sharded_dims else None)


def with_rows(params, active: tuple) -> tuple:
    """The parameters of `active` (group indices) that have rows on this rank."""
    return tuple(j for j in active if local(params[j]).numel() > 0)


def step(backend, job: GroupJob, rowless_states: list) -> None:
    """One step of a group of DTensor parameters; `job` holds the local shards with rows
    on this rank, `rowless_states` the states of the stepping parameters without any.

    A rank without rows in the group still takes part in the collective, with zero sums
    (the other ranks wait for them). The rowless parameters' step counts move with the
    group's, so that every rank holds the same ones (a checkpoint keeps one)."""
    gs = job.group_state
    steps_before = gs["step"].clone() if rowless_states else None
    if job.params:
        backend.step(job)
    else:
        acc = gs["weights"].dtype
        zeros = torch.zeros(job.plan.layout.num_units, dtype=acc, device=gs["weights"].device)
        zero = zeros.new_zeros(())
        update_levels(job, UnitSums(s=zeros, qg=zeros, qu=zeros, param_dot=zero, param_sq=zero,
                                    finite=torch.ones((), dtype=torch.bool, device=zeros.device)))
    if rowless_states:  # (one launch, however many)
        steps = [st["step"] for st in rowless_states]
        torch._foreach_add_(steps, (gs["step"] - steps_before).to(steps[0].dtype))


def like_param(value: torch.Tensor, p, per_unit: bool = False):
    """`value`, this rank's part of something shaped like p (or like p's units, one value
    per row, with `per_unit`), as a DTensor placed as p is; a plain tensor as it is."""
    if not is_dtensor(p):
        return value
    shape = (p.shape[0],) if per_unit else p.shape
    stride = (1,) if per_unit else p.stride()
    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


# -- state dicts ------------------------------------------------------------------------
# torch.distributed.checkpoint's get/set_optimizer_state_dict keep only "state" and
# "param_groups" of an optimizer's state dict, so under FSDP2 each param group's entry
# carries its group state ("group_state") and the optimizer kind. Its unit rates are one
# DTensor per parameter, placed as the parameter (a flat array of this rank's rows would
# be saved once, as if every rank held the same); the rest is the same on every rank.
_GROUP_STATE, _KIND = "group_state", "optimizer_kind"


def checkpoint_form(state_dict: dict, groups: list) -> dict:
    """An optimizer's `state_dict()` in the form above; `groups` pairs each param group's
    parameters with its layout."""
    out = []
    for saved, gs, (params, layout) in zip(state_dict["param_groups"], state_dict["group_states"], groups):
        if gs is not None and "rate_unit" in gs:
            gs = {**gs, "rate_unit": [
                like_param(gs["rate_unit"][t.unit_offset : t.unit_offset + t.units], p, per_unit=True)
                for p, t in zip(params, layout.tensors)
            ]}
        out.append({**saved, _GROUP_STATE: gs, _KIND: state_dict[_KIND]})
    return {"state": state_dict["state"], "param_groups": out}


def from_checkpoint_form(state_dict: dict) -> dict:
    """A state dict in the form above back in the optimizer's own form (others as they are)."""
    groups = state_dict["param_groups"]
    if _KIND in state_dict or not groups or _GROUP_STATE not in groups[0]:
        return state_dict
    group_states = []
    for group in groups:
        gs = group[_GROUP_STATE]
        if gs is not None and "rate_unit" in gs:
            gs = {**gs, "rate_unit": torch.cat([local(rows) for rows in gs["rate_unit"]])}
        group_states.append(gs)
    plain = [{k: v for k, v in group.items() if k not in (_GROUP_STATE, _KIND)} for group in groups]
    return {**state_dict, "param_groups": plain, _KIND: groups[0][_KIND], "group_states": group_states}
