"""Launch tables of the triton backend, built once per step plan.

Static tables (from the plan's layout): per tensor its sizes and where its sums go
(`meta`), the reduction and step chunk lists (one program per chunk, grouped in one
bucket per parameter dtype), the units of long rows that the finishing launch adds up,
and the buffers the kernels write (sums, partials, flags). They change only with the
plan, or when a parameter's dtype changes. Every step of a group reuses them, so its
steps must be ordered on the device, as its parameters and state need anyway: a step on
another stream must wait for the last one (`Stream.wait_stream`). Keying them by stream
would not help, since two unordered steps race on the parameters themselves.

Pointer table: int64 [NUM_ROLES, n_tensors], one row per role (param, grad, states). A
row is checked and re-uploaded only when its tensors changed since the last step (their
addresses; for gradients also layout and dtype): with `zero_grad(set_to_none=True)` that
is the gradient row every step, a tuple comparison otherwise. On CUDA the upload is a
non-blocking copy from pinned memory (the caching host allocator keeps the buffer alive
until the copy has run), so a step never waits for the device. Such a copy must not be
captured in a CUDA graph (see `_refuse_capture`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import triton.language as tl

from ..hierarchy import StepPlan, TensorLayout
from ..options import GroupOptions


def _import_kernels():
    """multilevel_hd.kernels: setup.py installs the top-level kernels/ folder under that name;
    a source tree used through PYTHONPATH has no such package, so load the folder as it."""
    name = "multilevel_hd.kernels"
    if importlib.util.find_spec(name) is None:
        init = Path(__file__).resolve().parents[2] / "kernels" / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(sys.modules["multilevel_hd"], "kernels", module)
    return (importlib.import_module(f"{name}.{part}") for part in ("common", "reduce", "step"))


common, reduce, step = _import_kernels()

NUM_ROLES = common.NUM_ROLES
ROLE_PARAM, ROLE_GRAD = common.ROLE_PARAM.value, common.ROLE_GRAD.value
ROLE_STATE1, ROLE_STATE2 = common.ROLE_STATE1.value, common.ROLE_STATE2.value
ROLE_RATE, ROLE_STEP, ROLE_STATE3 = common.ROLE_RATE.value, common.ROLE_STEP.value, common.ROLE_STATE3.value
_TILE_COLUMNS = {
    reduce.CLASS_NARROW.value: reduce.NARROW.value,
    reduce.CLASS_WIDE.value: reduce.WIDE.value,
    reduce.CLASS_WIDE4.value: reduce.WIDE.value,
}
# The step kernel finds an element's unit with int32 arithmetic within a row.
MAX_ROW_LEN = 2**31 - 1 - step.BLOCK.value
# Parameter dtypes the kernels handle (rates and state are float32 for all of them).
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def state_keys(opts: GroupOptions) -> dict:
    """The state tensor each role reads and writes ({role: key}; absent roles unused)."""
    if opts.kind == "adam" and opts.amsgrad:  # STATE2 holds what u divides by (kernels/common.py)
        keys = {ROLE_STATE1: "exp_avg", ROLE_STATE2: "max_exp_avg_sq", ROLE_STATE3: "exp_avg_sq"}
    elif opts.kind == "adam":
        keys = {ROLE_STATE1: "exp_avg", ROLE_STATE2: "exp_avg_sq"}
    elif opts.momentum == 0:
        keys = {ROLE_STATE1: "prev_direction"}
    elif opts.nesterov:
        keys = {ROLE_STATE1: "prev_direction", ROLE_STATE2: "momentum_buffer"}
    else:
        keys = {ROLE_STATE1: "momentum_buffer"}
    if "param" in opts.levels:
        keys[ROLE_RATE] = "param_rate"
    keys[ROLE_STEP] = "step"
    return keys


def reduction_pieces(row_len: int) -> tuple[int, int, int]:
    """(tile class, pieces per unit, elements per piece) of a row of `row_len` elements.

    A long row is cut into the fewest pieces of at most WIDE elements, of equal length
    (rounded up to a multiple of 4 where the row allows 16-byte loads, so that every
    piece starts aligned; the last piece is shorter)."""
    if row_len <= reduce.NARROW.value:
        return reduce.CLASS_NARROW.value, 1, row_len
    count = -(-row_len // reduce.WIDE.value)
    length = -(-row_len // count)
    if row_len % 4:
        return reduce.CLASS_WIDE.value, count, length
    return reduce.CLASS_WIDE4.value, count, -(-length // 4) * 4


def unit_stride(p: torch.Tensor):
    """p.stride(0) (row_len for a single unit) if p's elements fill one dense block of
    memory, in any dimension order; None otherwise (a slice, an expanded view)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(p.stride(), p.shape) if sz > 1):
        if stride != expected:
            return None
        expected *= size
    return p.stride(0) if p.dim() and p.shape[0] > 1 else p.numel()


@dataclass
class Bucket:
    """The tensors of one parameter dtype and layout kind: one reduction launch and one
    step launch (strided layouts, rare, get their own so the common case stays lean)."""

    dtype: torch.dtype
    strided: bool
    reduce_chunks: torch.Tensor  # int64 [reduce.CHUNK_COLS, n]
    step_chunks: torch.Tensor  # int64 [step.CHUNK_COLS, n]
    chunk_base: int  # the column of its first reduction chunk in the group's partials

    @property
    def n_reduce(self) -> int:
        return self.reduce_chunks.shape[1]

    @property
    def n_step(self) -> int:
        return self.step_chunks.shape[1]


class GroupTables:
    """Everything the kernels of one group's step read besides the tensors themselves."""

    def __init__(self, plan: StepPlan, device: torch.device):
        _refuse_capture(device, "the group's first step")
        self.device = device
        self.layouts: list[TensorLayout] = plan.active_layouts
        self.n = len(self.layouts)
        self.num_units = plan.layout.num_units
        self.pieces = [reduction_pieces(t.row_len) for t in self.layouts]
        self.slots, long_units, slot_end, max_pieces = [], [], self.num_units, 1
        for t, (_, count, _) in zip(self.layouts, self.pieces):
            slot = t.unit_offset
            if count > 1:  # long rows: the pieces after the unit array, then finished
                slot, slot_end = slot_end, slot_end + t.units * count
                j = torch.arange(t.units)
                long_units.append(torch.stack([t.unit_offset + j, slot + j * count, torch.full_like(j, count)]))
                max_pieces = max(max_pieces, count)
            self.slots.append(slot)
        long_units = torch.cat(long_units, 1) if long_units else torch.zeros(3, 0, dtype=torch.int64)
        self.long_units = long_units.to(device)
        self.max_pieces = max_pieces
        # Rows: S, Qg, Qu. Columns: the unit array, then the pieces of long rows. Units of
        # tensors that do not step are never written and stay zero.
        self.sums = torch.zeros(3, slot_end, dtype=torch.float32, device=device)
        self.finite = torch.ones((), dtype=torch.uint8, device=device)  # bool: all g finite
        self.param_sums = torch.zeros(2, dtype=torch.float32, device=device)  # sum a*h, sum (a*g)^2
        self.old_steps = torch.zeros(self.n, dtype=torch.float32, device=device)
        self.pointers = torch.zeros(NUM_ROLES, self.n, dtype=torch.int64, device=device)
        self._keys: list = [None] * NUM_ROLES  # per role, what the uploaded row was built from
        self._aligned = [True] * NUM_ROLES
        # Built from the parameters' dtypes and strides (_build_layout).
        self.signature: tuple = ()
        self.meta = self.partials = None
        self.buckets: list[Bucket] = []

    @property
    def aligned(self) -> bool:
        """Every element tensor's address is 16-byte aligned (the kernels may vectorise)."""
        return all(ok for role, ok in enumerate(self._aligned) if role != ROLE_STEP)

    def bind(self, job, keys: dict):
        """Point the table at this step's tensors; None, or why they cannot be addressed."""
        params = job.params
        rows = {ROLE_PARAM: params, ROLE_GRAD: job.grads}
        rows.update({role: [st[key] for st in job.states] for role, key in keys.items()})
        for role in range(NUM_ROLES):
            tensors = rows.get(role)
            key = _key(role, tensors) if tensors is not None else ()  # () : an unused role
            if key == self._keys[role]:
                continue
            if tensors is not None:
                reason = self._check_params(params) if role == ROLE_PARAM else _check_like(tensors, params, role)
                if reason is not None:
                    return reason
            if role == ROLE_PARAM:  # the parameters moved: recheck every other row against them
                self._keys = [None] * NUM_ROLES
            self._upload(role, [x.data_ptr() for x in tensors] if tensors is not None else [0] * self.n)
            self._keys[role] = key
        return None

    def _check_params(self, params):
        signature = []
        for p, t in zip(params, self.layouts):
            if p.dtype not in TL_DTYPES:
                return f"parameters of dtype {p.dtype} are not handled by the Triton kernels"
            stride = unit_stride(p)
            if stride is None:
                return "a parameter does not fill a dense block of memory"
            if t.row_len > MAX_ROW_LEN:
                return f"a row of {t.row_len} elements exceeds the kernels' int32 row indexing"
            signature.append((p.dtype, stride))
        if tuple(signature) != self.signature:
            self._build_layout(tuple(signature))
        return None

    def _upload(self, role: int, addresses: list) -> None:
        _refuse_capture(self.device, f"new {_ROLE_NAMES[role]} tensors")
        host = torch.tensor(addresses, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self.pointers[role].copy_(host, non_blocking=True)
        self._aligned[role] = not any(a & 15 for a in addresses)

    def _build_layout(self, signature: tuple) -> None:
        """The metadata table and the chunk tables, one bucket per (dtype, strided)."""
        _refuse_capture(self.device, "a change of the parameters' dtypes or layouts")
        self.signature = signature
        rows = zip(self.layouts, self.pieces, self.slots, signature)
        meta = [
            (t.numel, t.row_len, t.unit_offset, count, length, slot, stride, t.units)
            for t, (_, count, length), slot, (_, stride) in rows
        ]
        self.meta = torch.tensor(meta, dtype=torch.int64).to(self.device)
        kinds = [(dtype, stride != t.row_len) for t, (dtype, stride) in zip(self.layouts, signature)]
        self.buckets, chunk_base = [], 0
        for kind in dict.fromkeys(kinds):
            reduce_cols, step_cols = [], []
            for i, (t, (cls, count, _)) in enumerate(zip(self.layouts, self.pieces)):
                if kinds[i] != kind:
                    continue
                rows = reduce.TILE.value // _TILE_COLUMNS[cls]
                firsts = torch.arange(0, t.units * count, rows)  # each tile's first piece
                reduce_cols.append(torch.stack(
                    [torch.full_like(firsts, i), firsts // count, firsts % count, torch.full_like(firsts, cls)]))
                starts = torch.arange(0, t.numel, step.BLOCK.value)
                step_cols.append(torch.stack([torch.full_like(starts, i), starts]))
            reduce_chunks = torch.cat(reduce_cols, 1).to(self.device)
            bucket = Bucket(*kind, reduce_chunks, torch.cat(step_cols, 1).to(self.device), chunk_base)
            chunk_base += bucket.n_reduce
            self.buckets.append(bucket)
        self.partials = torch.zeros(3, chunk_base, dtype=torch.float32, device=self.device)


_ROLE_NAMES = {ROLE_PARAM: "parameter", ROLE_GRAD: "gradient", ROLE_STATE1: "optimizer state",
               ROLE_STATE2: "optimizer state", ROLE_RATE: "param_rate", ROLE_STEP: "step count",
               ROLE_STATE3: "optimizer state"}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _refuse_capture(device: torch.device, cause: str) -> None:
    """Table uploads (a fresh host buffer copied without blocking) cannot be captured in a
    CUDA graph: every replay would copy from that buffer after it was freed and reused.
    Raise a clear error instead: a captured step must see the tensors of the last eager
    step (a tuple comparison finds that nothing needs uploading)."""
    if _capturing(device):
        raise RuntimeError(
            f"multilevel_hd triton backend: {cause} inside a CUDA graph capture; the step would "
            "capture an upload of its pointer table from host memory that is reused after the "
            "capture. Capture whole iterations only after eager warm-up steps, with gradients "
            "that keep their memory: call opt.zero_grad(set_to_none=False) (not "
            "set_to_none=True) so that backward accumulates into the same .grad tensors, or "
            "assign static gradient tensors."
        )


def _key(role: int, tensors) -> tuple:
    """What decides whether a role's row must be rebuilt: the addresses, and for gradients
    also the layout and dtype (a fresh gradient may reuse the last one's memory)."""
    if role == ROLE_GRAD:
        return tuple((g.data_ptr(), g.stride(), g.dtype) for g in tensors)
    return tuple(x.data_ptr() for x in tensors)


def _check_like(tensors, params, role: int):
    """None if gradients (or state tensors) share their parameters' layout and dtype."""
    if role == ROLE_STEP:
        ok = all(s.dtype == torch.float32 and s.dim() == 0 for s in tensors)
        return None if ok else "a parameter's step count is not a float32 scalar"
    if role == ROLE_GRAD:  # (torch lets a parameter's grad_dtype differ from its dtype)
        ok = all(_same_layout(g, p) and g.dtype == p.dtype for g, p in zip(tensors, params))
    else:
        ok = all(_same_layout(x, p) and x.dtype == torch.float32 for x, p in zip(tensors, params))
    return None if ok else "a gradient or state tensor differs from its parameter in layout or dtype"


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every element at the same offset: the strides of size-1 dimensions do not matter
    (autograd may give such a gradient other strides there); csrc/ops.cpp's same_layout."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)
