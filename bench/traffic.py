"""The minimum number of bytes one optimizer step must move to and from memory.

A step on large models is memory-bound, so "achieved GB/s = minimum bytes / time" says how close
an implementation is to the machine's limit. The minimum assumes a perfect implementation:
every tensor is read or written once per pass, in the step's parameter dtype (s bytes/element)
or, for rates and level sums, float32 (r = 4 bytes; 8 for float64 parameters, docs/algorithm.md section 4).
Steady state only (t >= 2, no skipped step); the first step's lazy state creation is ignored.

torch.optim (one pass): read g and p, write p, plus the direction's state:
    SGD, no momentum          3s   (12 B/elem in float32)
    SGD, momentum / nesterov  5s   (read and write `buf`: 20 B/elem)
    Adam / AdamW              7s   (read and write m and v: 28 B/elem)
    Adam, amsgrad             9s   (and vmax: 36 B/elem)

multilevel_hd (docs/algorithm.md section 2) needs two passes over the elements, because every coarse rate
(and the non-finite guard) depends on a sum over the whole group before any element may step:

1. reduction: read g (non-finite flag) and, when a hyper-gradient sum is needed (a coarse level,
   or more than one level so that the weights move), whatever u_prev is computed from, p as
   well for coupled weight decay (h uses g + wd * p), and the param-level rates when the
   weights need G_param = sum alpha_param * h.
2. step: the torch.optim pass above plus whatever the direction must remember for the next
   u_prev, and for the param level its rate tensor (read and written, 2r) together with h,
   recomputed from u_prev's inputs or else stored by the reduction (2r), whichever is cheaper.

What u_prev is computed from, per base optimizer (docs/algorithm.md section 3):
    Adam          m and v before this step's update (already read by the step pass);
                  with amsgrad m and vmax
    SGD momentum  buf before this step's update (already read)
    SGD, mu = 0   u_prev = the previous g, which nobody keeps: the step pass writes a copy
    SGD nesterov  u_prev = g_prev + mu * buf_prev; g_prev is lost, so the step pass writes u

So MultiLevelAdam with coarse levels moves (3s) + (7s) = 40 B/elem, MultiLevelSGD with
nesterov momentum (2s) + (6s) = 32 B/elem, and the param level adds 3r in a multi-level
Adam (the reduction reads the rates, the step reads and writes them).

Per coarse group (a unit, a layer, the global level): the reduction writes its sum(s) and the
level update reads them back (2r per sum: S, plus Qg and Qu for the multiplicative rule),
and the rate is read and written once (2r). This is small next to the element traffic
(ResNet-50 has 81,680 units for 25.6 M elements) but counted.
"""
from __future__ import annotations

import torch

from .shapes import Shape, numel, units


def _direction_state(family: str, opts: dict, hyper: bool):
    """(state the step pass reads, state it writes, state u_prev is computed from)."""
    if family == "adam":
        if opts.get("amsgrad", False):
            return {"m", "v", "vmax"}, {"m", "v", "vmax"}, {"m", "vmax"}
        return {"m", "v"}, {"m", "v"}, {"m", "v"}
    if opts.get("momentum", 0.0) == 0.0:
        return set(), ({"u_prev"} if hyper else set()), {"u_prev"}
    if opts.get("nesterov", False):
        return {"buf"}, ({"buf", "u_prev"} if hyper else {"buf"}), {"u_prev"}
    return {"buf"}, {"buf"}, {"buf"}


def min_bytes(family: str, opts: dict, levels, shapes: list[Shape], dtype: torch.dtype) -> int:
    """Minimum bytes of one steady-state step; `levels=None` means plain torch.optim."""
    s = torch.empty((), dtype=dtype).element_size()
    r = 8 if dtype == torch.float64 else 4
    n = numel(shapes)
    reads, writes, uprev_from = _direction_state(family, opts, hyper=levels is not None)
    step = s * (3 + len(reads) + len(writes))
    if levels is None:
        return n * step

    coarse = [level for level in levels if level != "param"]
    has_param = "param" in levels
    moving_weights = len(levels) > 1
    needs_sums = bool(coarse) or moving_weights
    coupled_decay = opts.get("weight_decay", 0.0) > 0 and not opts.get("decoupled_weight_decay")

    reduce = 0
    if needs_sums or opts.get("skip_nonfinite", True):
        reduce += s
    if needs_sums:
        reduce += s * len(uprev_from) + s * coupled_decay + r * (has_param and moving_weights)
    if has_param:
        step += 2 * r + min(s * len(uprev_from - reads), 2 * r)

    sums = 3 if opts.get("hypergrad_rule", "additive") == "multiplicative" else 1
    groups = {"global": 1, "layer": len(shapes), "unit": units(shapes)}
    per_group = sum(groups[level] for level in coarse) * (2 * sums + 2) * r
    return n * (reduce + step) + per_group
