"""Interleaved step timing: every candidate runs once per round, side by side, so that a noisy
shared machine slows all of them alike and per-round ratios stay meaningful."""
from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Big enough to stream from DRAM (HBM) on any machine: beyond every L2/L3 in sight.
STREAM_BYTES = 256 * 2**20


@dataclass
class Subject:
    name: str
    run: Callable[[], object]  # the timed work
    prepare: Callable[[], None] = lambda: None  # untimed work before each run


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes.

    On CUDA the queue is drained first and the call is bracketed by events, so the time runs
    from the step's start to its last kernel's end; host launch overhead counts whenever the
    GPU has to wait for it, as it does for a launch-bound optimizer.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def interleave(subjects: list[Subject], rounds: int, warmup: int, device: torch.device,
               seed: int = 0) -> dict[str, list[float]]:
    """Per subject, the seconds of each of `rounds` runs (index i: round i), after `warmup`
    untimed rounds; the order within a round is shuffled so that no subject always follows
    the same neighbour (whose leftovers in cache or a clock boost it would inherit)."""
    order = list(subjects)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {s.name: [] for s in subjects}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed step is noise, not the optimizer's cost
    try:
        for r in range(warmup + rounds):
            rng.shuffle(order)
            for subject in order:
                subject.prepare()
                seconds = time_once(subject.run, device)
                if r >= warmup:
                    times[subject.name].append(seconds)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def bandwidth_subjects(device: torch.device) -> list[tuple[Subject, int]]:
    """Streaming passes over STREAM_BYTES, each with the bytes it moves (read + written).

    `copy_` is the textbook measure, but it writes lines it never read, so write-allocate adds
    a read nobody counts and it understates what an in-place pass achieves (fused Adam beat it
    by 40% on a 2-core EPYC). An in-place `mul_` reads and writes each byte, exactly the
    access pattern of an optimizer updating p and its state; the sign flip keeps it bounded.
    A `sum` only reads: the access pattern of a reduction pass, which on some machines
    streams far slower than a read-write loop (about 60% of it on that EPYC).
    """
    src = torch.rand(STREAM_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    return [
        (Subject("copy_", lambda: dst.copy_(src)), 2 * STREAM_BYTES),
        (Subject("in-place", lambda: src.mul_(-1.0)), 2 * STREAM_BYTES),
        (Subject("read-only", lambda: src.sum()), STREAM_BYTES),
    ]
