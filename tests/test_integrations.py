"""The training libraries a user drops the optimizers into, run for real (issue 19): Lightning
(bf16-mixed and 16-mixed fits with gradient clipping and accumulation, a scheduler dict,
checkpoint resume equal to continuing, ddp on 2 CPU processes), accelerate (prepare,
clip_grad_norm_, save_state / load_state continuing bit for bit) and timm's scheduler and
param-group helpers where timm imports. Tiny models, a few steps each (~30 s in all on 2
shared cores, Lightning's import included; the ddp run ~20 s of it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multilevel_hd as mlhd

FIXTURES = Path(__file__).parent / "fixtures"


def _data(n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return torch.utils.data.TensorDataset(x, (x[:, :2] * 3 - 1).detach())


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _assert_params_equal(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# -- Lightning --------------------------------------------------------------------------------
L = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (.ci/setup.sh installs it)")
sys.path.insert(0, str(FIXTURES))
from lightning_module import HDModule  # noqa: E402  (the module the ddp script runs too)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                     deterministic=True, **kw)


def _loader(n=32):
    return torch.utils.data.DataLoader(_data(n), batch_size=4)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_mixed_precision_fit_with_clipping_and_accumulation(tmp_path, precision):
    """gradient_clip_val under mixed precision (Lightning refused it while the optimizer
    declared in-step unscaling), gradient accumulation, a scheduler dict stepped per step:
    the loss falls and the learned rates move away from lr."""
    module = HDModule(_model())
    # On the CPU Lightning turns precision="16-mixed" into bf16-mixed; its plugin with a
    # GradScaler keeps float16 autocast and the scaler (what 16-mixed is on a GPU).
    amp = dict(plugins=[L.plugins.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]) \
        if precision == "16-mixed" else dict(precision=precision)
    trainer = _trainer(tmp_path, gradient_clip_val=0.5, accumulate_grad_batches=2, max_steps=4, **amp)
    first = module.loss_on(_data())
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    assert trainer.global_step == 4 and opt.skipped_steps() == [0]
    assert (trainer.precision_plugin.scaler is not None) == (precision == "16-mixed")
    assert module.loss_on(_data()) < first
    assert float(opt.rates()[0]["global"]) != module.lr  # rates learned
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_lightning_refuses_clipping_with_in_step_unscaling(tmp_path):
    """What the default avoids: an optimizer that declares in-step unscaling (as fused=True
    does) gets Lightning's refusal of gradient_clip_val, under bf16-mixed too."""
    module = HDModule(_model())
    module.optimizer_options = dict(amp_unscale_in_step=True)
    trainer = _trainer(tmp_path, precision="bf16-mixed", gradient_clip_val=0.5, max_steps=1)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        trainer.fit(module, _loader())


def test_lightning_checkpoint_resume_equals_continuing(tmp_path):
    """Fit one epoch of 3 steps, save a checkpoint (ModelCheckpoint), resume from it with
    ckpt_path for a second epoch: the parameters and the optimizer's weights are those of an
    uninterrupted 2-epoch fit, bit for bit. (Epochs, not max_steps: a fit stopped by
    max_steps at an epoch's end resumes inside that epoch and repeats its first batch.)"""
    straight = HDModule(_model())
    _trainer(tmp_path / "a", precision="bf16-mixed", gradient_clip_val=0.5, max_epochs=2).fit(straight, _loader(12))

    first = HDModule(_model())
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
                        precision="bf16-mixed", gradient_clip_val=0.5, max_epochs=1, callbacks=[saver])
    trainer.fit(first, _loader(12))
    resumed = HDModule(_model(seed=1))  # other weights: the checkpoint must bring them back
    resumer = _trainer(tmp_path / "b", precision="bf16-mixed", gradient_clip_val=0.5, max_epochs=2)
    resumer.fit(resumed, _loader(12), ckpt_path=saver.last_model_path)
    assert resumer.global_step == 6
    _assert_params_equal(straight, resumed)
    assert torch.equal(straight.trainer.optimizers[0].rates()[0]["weights"],
                       resumer.optimizers[0].rates()[0]["weights"])


def test_lightning_ddp_on_two_cpu_processes(tmp_path):
    """strategy="ddp" on 2 CPU processes (Lightning starts the second by running the script
    again): the ranks end with the same parameters and rates, and they moved."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(FIXTURES / "lightning_ddp.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    start = _model().state_dict()
    assert not torch.equal(ranks[0]["model.0.weight"], start["0.weight"])


# -- accelerate -------------------------------------------------------------------------------
def _accelerate_run(tmp_path, steps, save_at=None, load=False):
    """`steps` steps of an accelerate loop (bf16, prepare, clip_grad_norm_, a scheduler);
    save_state after `save_at` steps; with `load`, load_state first and take the steps after
    the saved ones (the loader skips the batches already seen)."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (.ci/setup.sh installs it)")
    accelerate.state.AcceleratorState._reset_state(True)
    accelerate.utils.set_seed(0)
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model = _model()
    opt = mlhd.MultiLevelAdamW(model.parameters(), lr=1e-2, hypergrad_lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    loader = torch.utils.data.DataLoader(_data(), batch_size=4)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    start = 0
    if load:
        acc.load_state(tmp_path / "state")
        start = save_at
        loader = acc.skip_first_batches(loader, save_at)
    for step, (x, y) in enumerate(loader, start):
        if step == steps:
            break
        with acc.autocast():
            loss = torch.nn.functional.mse_loss(model(x), y)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step + 1 == save_at and not load:
            acc.save_state(tmp_path / "state")
    return acc.unwrap_model(model), opt.optimizer


def test_accelerate_save_state_load_state_continues_bit_for_bit(tmp_path):
    straight, opt = _accelerate_run(tmp_path, 6, save_at=3)
    resumed, opt2 = _accelerate_run(tmp_path, 6, save_at=3, load=True)
    _assert_params_equal(straight, resumed)
    assert torch.equal(opt.rates()[0]["global"], opt2.rates()[0]["global"])
    assert float(opt.rates()[0]["global"]) != 1e-2  # rates learned, and came back


# -- timm -------------------------------------------------------------------------------------
def test_timm_scheduler_and_param_groups():
    """timm's param_groups_weight_decay groups and CosineLRScheduler with warm-up and
    step_update drive the optimizer as they drive torch.optim's."""
    try:
        import timm.optim
        import timm.scheduler
    except ImportError as err:  # timm needs torchvision, which has no build beside the CPU torch 2.13 wheel
        pytest.skip(f"timm does not import here ({err}); it needs torchvision")
    model = _model()
    groups = timm.optim.param_groups_weight_decay(model, weight_decay=0.05)
    opt = mlhd.MultiLevelAdamW(groups, lr=1e-2)
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=8, warmup_t=2, warmup_lr_init=1e-4, t_in_epochs=False)
    x, y = _data().tensors
    for step in range(8):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step_update(step + 1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    assert opt.param_groups[0]["lr"] < 1e-2 and opt.skipped_steps() == [0, 0]
