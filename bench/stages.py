"""Per-stage times of a step on the compiled CPU backend ("cpp"): reduce, levels, apply.

`cpp_backend.step` runs a step as `run_step(job, ops, geometry)`, calling the three ops of the
namespace `ops` (torch.ops.multilevel_hd). `timed_stages` wraps that namespace, for the steps
taken inside it, in one whose stage ops add their wall time to a dict: the CPU ops return when
their work is done, so time.perf_counter around each call is the stage's time, and nothing in
the backend or the optimizer changes. What the step spends outside the ops (Python: checks,
plan, buffers) is the step's time less the stages'. The wrapping costs a few microseconds
per op call, so a report times the plain step for its totals and an instrumented copy of the
same optimizer, in the same rounds, for the split.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

STAGES = ("reduce", "levels", "apply")


class _TimedOps:
    """`ops` (an op namespace) whose stage ops add their seconds to `seconds[stage]`."""

    def __init__(self, ops, seconds: dict[str, float]):
        self._ops, self._seconds = ops, seconds

    def __getattr__(self, name: str):
        op = getattr(self._ops, name)
        if name not in self._seconds:
            return op

        def timed(*args):
            start = time.perf_counter()
            try:
                return op(*args)
            finally:
                self._seconds[name] += time.perf_counter() - start

        return timed


@contextlib.contextmanager
def timed_stages() -> Iterator[dict[str, float]]:
    """Within the block, the stage ops of every step through `cpp_backend.run_step` are timed
    (CPU ops only: CUDA ones return before their kernels end): the dict yielded holds each
    stage's seconds summed over the steps (and the buckets, param groups) run in the block."""
    from multilevel_hd.backends import cpp_backend  # (the report runs without multilevel_hd, too)

    seconds = dict.fromkeys(STAGES, 0.0)
    run_step = cpp_backend.run_step

    def timed_run_step(job, ops, geometry):
        run_step(job, _TimedOps(ops, seconds), geometry)

    cpp_backend.run_step = timed_run_step  # looked up at each call by cpp_backend.step
    try:
        yield seconds
    finally:
        cpp_backend.run_step = run_step
