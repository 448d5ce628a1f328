"""FSDP2 (`fully_shard`): two CPU processes (gloo), a float64 MLP with `fully_shard` on each
layer and the root, each rank on half of a batch, give every rank the rates and weights of
one process on the whole batch, and parameters equal to that run's, to 1e-10.

The MLP's shapes make the shards uneven (3 rows: 2 on rank 0, 1 on rank 1) and leave
rank 1 without any row of the last layer (1 row), so a rank with an empty shard takes
part in every collective. Every run meets one NaN gradient on rank 1 alone: both ranks must
skip that step. The processes are spawned once for the module (`run_ranks`); each case
is a fresh model and optimizer inside them.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multilevel_hd as mlhd
from multilevel_hd.backends import available_backends
from test_distributed import run_ranks

WORLD_SIZE = 2
STEPS = 5
NAN_STEP = 2  # rank 1 alone gets a NaN gradient here: every rank skips the step
BATCH = 8
LEVELS = ("global", "layer", "unit", "param")
SUBSETS = [levels for k in range(1, 5) for levels in itertools.combinations(LEVELS, k)]
# the compiled backends run the level stage of the torch one for a sharded group (cuda: its
# kernels emulated on the CPU, MLHD_CUDA_ON_CPU=1); triton steps it with the torch backend
BACKENDS = [b for b in ("torch", "cpp", "cuda") if b in available_backends(torch.device("cpu"))]
FALLING_BACK = [b for b in ("triton",) if b in available_backends(torch.device("cpu"))]
OPTIMIZERS = {  # large hyper-gradient rates, so that rates and weights visibly move
    "adam": (mlhd.MultiLevelAdam, dict(lr=1e-2, hypergrad_lr=1e-3)),
    "adamw": (mlhd.MultiLevelAdamW, dict(lr=1e-2, hypergrad_lr=1e-3, weight_decay=0.1)),
    "sgdn": (mlhd.MultiLevelSGD, dict(lr=0.1, momentum=0.9, nesterov=True, hypergrad_lr=1e-2)),
}
RULES = {"additive": dict(hypergrad_rule="additive"),
         "multiplicative": dict(hypergrad_rule="multiplicative", hypergrad_lr=0.05, combination_lr=0.5)}


def _cases():
    """(optimizer, rule, levels, backend): every level subset and rule with Adam on the torch
    backend; all four levels with each optimizer, rule and backend (two with triton's fallback)."""
    cases = [("adam", rule, levels, "torch") for rule in RULES for levels in SUBSETS]
    cases += [(name, rule, LEVELS, backend) for name in OPTIMIZERS for rule in RULES for backend in BACKENDS
              if (name, backend) != ("adam", "torch")]
    cases += [(name, rule, LEVELS, backend) for name, rule in (("adam", "additive"), ("sgdn", "multiplicative"))
              for backend in FALLING_BACK]
    return cases


CASES = _cases()
SPLIT_CASES = [("adam", "additive", LEVELS, "cpp"), ("sgdn", "multiplicative", LEVELS, "torch")]
HSDP_CASES = [("adam", "additive", LEVELS, "torch")]
SCALER_CASES = [("adam", "additive", LEVELS, backend) for backend in BACKENDS[:2]]
RESUME_CASES = [("adam", "additive", LEVELS, "cpp"), ("sgdn", "multiplicative", LEVELS, "torch")]


def case_id(case) -> str:
    name, rule, levels, backend = case
    return f"{name}-{rule}-{'+'.join(levels)}-{backend}"


def batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 5, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=gen, dtype=torch.float64))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def sharded_mlp(mesh) -> nn.Module:
    """`mlp()` with fully_shard on each Linear and the root (HSDP on a 2-D mesh)."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def param_groups(model, split: bool):
    """The parameters, or with `split` two groups: the last layer (no rows on rank 1) alone."""
    params = list(model.parameters())
    return [{"params": params[:4]}, {"params": params[4:]}] if split else params


def optimizer(case, params):
    name, rule, levels, backend = case
    cls, kwargs = OPTIMIZERS[name]
    return cls(params, levels=levels, backend=backend, **{**kwargs, **RULES[rule]})


def train(case, model, x, y, nan_rank: bool | None = True, scaler=None, split: bool = False) -> dict:
    """STEPS steps of `case` (a NaN gradient at NAN_STEP if `nan_rank`; None: on no rank); the final
    parameters, weights, rates and effective rates (DTensors gathered). `split`: two param groups."""
    opt = optimizer(case, param_groups(model, split))
    run(model, opt, x, y, range(STEPS), nan_rank, scaler)
    # (the NaN is in the first group's gradient)
    assert opt.skipped_steps() == [1 if nan_rank is not None else 0] + [0] * split
    return _results(model, opt)


def run(model, opt, x, y, steps, nan_rank: bool = False, scaler=None) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if step == NAN_STEP and nan_rank:
            first = next(model.parameters()).grad
            getattr(first, "_local_tensor", first).view(-1)[0] = float("nan")
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _results(model, opt) -> dict:
    out = {"params": [_full(p.detach()).clone() for p in model.parameters()], "weights": []}
    for rates in opt.rates():
        out["weights"].append(rates["weights"])
        for level in LEVELS:
            if level in rates:
                out.setdefault(level, []).extend([rates[level]] if level == "global" else map(_full, rates[level]))
    out["kappa"] = [_full(opt.effective_rate(p)) for p in model.parameters()]
    out["steps"] = [opt.state[p]["step"] for p in model.parameters()]  # rank 1's rowless ones too
    return out


def rank_main(rank: int, world_size: int, checkpoint_dir: str) -> dict:
    """Everything the tests below check, on this rank, in one process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    hsdp_mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))
    x, y = batch()
    share = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    x, y = x[share], y[share]
    last_layer = list(sharded_mlp(mesh).parameters())[4:]  # what SPLIT_CASES and HSDP_CASES rely on
    assert all(p.to_local().numel() == 0 for p in last_layer) == (rank == 1)
    assert list(sharded_mlp(hsdp_mesh).parameters())[0].placements == (Replicate(), Shard(0))
    return {
        "cases": {case: train(case, sharded_mlp(mesh), x, y, nan_rank=rank == 1) for case in CASES},
        "split": {case: train(case, sharded_mlp(mesh), x, y, nan_rank=rank == 1, split=True) for case in SPLIT_CASES},
        "hsdp": {case: train(case, sharded_mlp(hsdp_mesh), x, y, nan_rank=rank == 1) for case in HSDP_CASES},
        "scaler": {case: train(case, sharded_mlp(mesh), x, y, nan_rank=None, scaler=torch.amp.GradScaler("cpu"))
                   for case in SCALER_CASES},
        "resume": {case: checkpoint_and_resume(case, mesh, x, y, f"{checkpoint_dir}/{i}")
                   for i, case in enumerate(RESUME_CASES)},
        "refused": refused_placements(mesh),
    }


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return run_ranks(rank_main, WORLD_SIZE, tmp, str(tmp / "checkpoints"))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fsdp_matches_one_process_on_the_whole_batch(fsdp_results, case):
    rank0, rank1 = (result["cases"][case] for result in fsdp_results)
    single = train(case, mlp(), *batch())
    assert_matches(rank0, rank1, single, case)


def assert_matches(rank0: dict, rank1: dict, single: dict, case) -> None:
    """Both ranks hold the same (gathered) values, equal to the one-process run's to 1e-10,
    and the rates and weights moved, so a wrong hyper-gradient sum would show."""
    lr = OPTIMIZERS[case[0]][1]["lr"]
    for key, tensors in single.items():
        assert all(torch.equal(a, b) for a, b in zip(rank0[key], rank1[key], strict=True)), f"{key}: the ranks differ"
        for i, (a, b) in enumerate(zip(rank0[key], tensors, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=lambda m: f"{key}[{i}]: {m}")
        if key in LEVELS:  # the rates moved, so a difference in the hyper-gradients would show
            assert max((t / lr - 1).abs().max() for t in tensors) > 1e-3, key
    if len(case[2]) > 1:  # the weights moved, by far more than the tolerance
        initial = optimizer(case, mlp().parameters()).rates()[0]["weights"]
        assert all((w - initial).abs().max() > 1e-6 for w in single["weights"])


@pytest.mark.parametrize("case", SPLIT_CASES, ids=case_id)
def test_fsdp_rank_without_rows_in_a_param_group(fsdp_results, case):
    """The last layer in a param group of its own: rank 1 holds none of its rows, yet joins
    each step's collective (with zero sums) and keeps the group's rates and weights."""
    rank0, rank1 = (result["split"][case] for result in fsdp_results)
    assert_matches(rank0, rank1, train(case, mlp(), *batch(), split=True), case)


@pytest.mark.parametrize("case", HSDP_CASES, ids=case_id)
def test_hsdp_reduces_over_the_shard_dimension(fsdp_results, case):
    """fully_shard on a 2-D mesh (HSDP): placements (Replicate(), Shard(0)); the sums are
    reduced over the mesh dimension the rows are sharded along."""
    rank0, rank1 = (result["hsdp"][case] for result in fsdp_results)
    assert_matches(rank0, rank1, train(case, mlp(), *batch()), case)


@pytest.mark.parametrize("case", SCALER_CASES, ids=case_id)
def test_fsdp_with_grad_scaler(fsdp_results, case):
    """torch.amp.GradScaler hands the optimizer its scale (grads are read as g / scale)."""
    rank0, rank1 = (result["scaler"][case] for result in fsdp_results)
    single = train(case, mlp(), *batch(), nan_rank=None, scaler=torch.amp.GradScaler("cpu"))
    assert_matches(rank0, rank1, single, case)


def checkpoint_and_resume(case, mesh, x, y, path: str) -> dict:
    """Two steps, a torch.distributed.checkpoint save of model and optimizer, three more
    steps; then a fresh model and optimizer loaded from the checkpoint take the same three."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = sharded_mlp(mesh)
    opt = optimizer(case, model.parameters())
    run(model, opt, x, y, range(2))
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)
    run(model, opt, x, y, range(2, STEPS))
    straight = _results(model, opt)

    model = sharded_mlp(mesh)
    opt = optimizer(case, model.parameters())
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd)
    run(model, opt, x, y, range(2, STEPS))
    return {"straight": straight, "resumed": _results(model, opt)}


@pytest.mark.parametrize("case", RESUME_CASES, ids=case_id)
def test_fsdp_checkpoint_resumes_on_the_same_mesh(fsdp_results, case):
    for result in fsdp_results:
        straight, resumed = result["resume"][case]["straight"], result["resume"][case]["resumed"]
        for key, tensors in straight.items():
            assert all(torch.equal(a, b) for a, b in zip(tensors, resumed[key], strict=True)), key


def refused_placements(mesh) -> dict:
    """The messages of the constructors that must refuse (nothing else is built)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    weight = torch.ones(4, 6, dtype=torch.float64)
    attempts = {
        "shard1": lambda: [nn.Parameter(distribute_tensor(weight, mesh, [Shard(1)]))],
        "mixed": lambda: [nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)])), nn.Parameter(weight.clone())],
    }
    messages = {}
    for name, params in attempts.items():
        try:
            mlhd.MultiLevelAdam(params())
        except ValueError as err:
            messages[name] = str(err)
    return messages


def test_fsdp_refuses_placements_without_whole_units(fsdp_results):
    for result in fsdp_results:
        refused = result["refused"]
        assert "parameter 0 of param group 0" in refused["shard1"] and "Shard(dim=1)" in refused["shard1"]
        assert "mixes DTensor parameters" in refused["mixed"]
