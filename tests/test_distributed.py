"""Data-parallel training: DistributedDataParallel over two CPU processes (gloo) with each
rank on half of a batch gives the same parameters, rates and weights on both ranks, and
the same as one process on the whole batch (the averaged half-batch gradients equal the
full-batch gradient up to rounding). Sharded training: ZeroRedundancyOptimizer gives each
rank some of the parameters; with `sharding_group` the global sums are all-reduced, so
the run again equals the one-process run. Every run meets one NaN gradient, which only
the rank holding that parameter sees: all ranks must skip that step together.

`run_ranks` spawns the processes once for all cases (spawning and importing torch costs
seconds); other multi-process tests can reuse it with their own per-rank function.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from torch.distributed.optim import ZeroRedundancyOptimizer

import multilevel_hd as mlhd
from multilevel_hd.backends import available_backends

WORLD_SIZE = 2
STEPS = 5
NAN_STEP = 2  # every run gets a NaN in the last parameter's gradient here, and skips the step
BATCH = 8  # split evenly between the ranks
LEVELS = ("global", "layer", "unit", "param")
# "auto" and every concrete CPU backend; Triton on the CPU is its slow interpreter.
BACKENDS = ["auto"] + [b for b in available_backends(torch.device("cpu")) if b not in ("reference", "triton")]
OPTIMIZERS = {  # large hyper-gradient rates, so that rates and weights visibly move in 5 steps
    "adam": (mlhd.MultiLevelAdam, dict(lr=1e-2, hypergrad_rule="additive", hypergrad_lr=1e-3)),
    "sgd-nesterov": (mlhd.MultiLevelSGD, dict(lr=0.1, momentum=0.9, nesterov=True, hypergrad_rule="additive",
                                              hypergrad_lr=1e-2)),
}
CASES = [(name, backend) for name in OPTIMIZERS for backend in BACKENDS]


# --------------------------------------------------------------------------- processes
def run_ranks(fn, world_size: int, tmp_path, *args) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes joined in a gloo
    process group (a FileStore in tmp_path); returns what each rank returned, in rank order
    (anything torch.save can write). `fn` must be a module-level function."""
    store = tmp_path / "store"
    assert not store.exists(), "a FileStore file serves one process group: use a fresh tmp_path"
    mp.spawn(_rank_main, args=(fn, world_size, str(tmp_path), args), nprocs=world_size, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def _rank_main(rank: int, fn, world_size: int, tmp_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))  # a rank stuck in a collective fails the test
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(tmp_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- training
def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 2, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=gen)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()


def train(case: tuple, model: nn.Module, x, y, sharded: bool = False) -> dict:
    """STEPS steps of one case on (x, y); lists of the final parameters, weights and each
    level's rates. `sharded`: through ZeroRedundancyOptimizer, each rank stepping its own
    share of the parameters; the rates are then those of this rank's share, with "shard"
    giving the indices of its parameters in the model."""
    name, backend = case
    cls, kwargs = OPTIMIZERS[name]
    if sharded:
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, levels=LEVELS, backend=backend,
                                       sharding_group=dist.group.WORLD, **kwargs)
        opt = zero.optim
    else:
        opt = zero = cls(model.parameters(), levels=LEVELS, backend=backend, **kwargs)
    for step in range(STEPS):
        zero.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if step == NAN_STEP:  # one rank's share alone sees it: the skip must be all-reduced
            list(model.parameters())[-1].grad.view(-1)[0] = float("nan")
        zero.step()
    assert opt.skipped_steps() == [1]
    rates = opt.rates()[0]
    position = {p: i for i, p in enumerate(model.parameters())}
    tensors = {
        "params": [p.detach().clone() for p in model.parameters()],
        "shard": [torch.tensor([position[p] for p in opt.param_groups[0]["params"]])],
        "weights": [rates["weights"]],
    }
    return tensors | {level: rates[level] if level != "global" else [rates[level]] for level in LEVELS}


def ddp_cases(rank: int, world_size: int) -> dict:
    """Every case on this rank's share of the batch, the model wrapped in DDP."""
    x, y = batch()
    share = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    return {case: train(case, nn.parallel.DistributedDataParallel(small_net()), x[share], y[share]) for case in CASES}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_ranks(ddp_cases, WORLD_SIZE, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_ddp_matches_one_process_on_the_whole_batch(ddp_results, case):
    rank0, rank1 = (result[case] for result in ddp_results)
    single = train(case, small_net(), *batch())
    lr = OPTIMIZERS[case[0]][1]["lr"]
    for key, tensors in single.items():
        if key == "shard":
            continue
        assert all(torch.equal(a, b) for a, b in zip(rank0[key], rank1[key], strict=True)), f"{key} differ between the ranks"
        for i, (a, b) in enumerate(zip(rank0[key], tensors, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=lambda m: f"{key}[{i}]: {m}")
        if key in LEVELS:  # the rates moved, so a difference in the hyper-gradients would show
            assert max((t / lr - 1).abs().max() for t in tensors) > 0.05, key
    assert (single["weights"][0] - 1 / len(LEVELS)).abs().max() > 1e-3


def sharded_cases(rank: int, world_size: int) -> dict:
    """Every case with DDP for the gradients and ZeroRedundancyOptimizer for the step."""
    x, y = batch()
    share = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    model = {case: nn.parallel.DistributedDataParallel(small_net()) for case in SHARDED_CASES}
    return {case: train(case, model[case], x[share], y[share], sharded=True) for case in SHARDED_CASES}


# the compiled backends and the torch backend share the level stage, where the all-reduce is
SHARDED_CASES = [(name, "auto") for name in OPTIMIZERS] + [("adam", "torch")]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    return run_ranks(sharded_cases, WORLD_SIZE, tmp_path_factory.mktemp("zero"))


@pytest.mark.parametrize("case", SHARDED_CASES, ids="-".join)
def test_sharded_run_matches_one_process(sharded_results, case):
    """Each rank steps only its share, yet global rate, weights and every parameter equal
    the one-process run; the layer, unit and param rates of each share equal that run's
    rates of the same parameters."""
    ranks = [result[case] for result in sharded_results]
    single = train(case, small_net(), *batch())
    shards = [r["shard"][0].tolist() for r in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(len(single["params"]))) and all(shards)
    for r in ranks:
        for key in ("params", "weights", "global"):
            for a, b in zip(r[key], single[key], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=lambda m: f"{key}: {m}")
        for level in ("layer", "unit", "param"):
            for local, index in enumerate(r["shard"][0].tolist()):
                torch.testing.assert_close(r[level][local], single[level][index], rtol=1e-10, atol=1e-14,
                                           msg=lambda m: f"{level}[{index}]: {m}")
