"""--throughput: images/s of a ResNet-50 training step per optimizer, and the optimizer's share."""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .loop import warm_up_backend
from .models import resnet50
from .optimizers import OptSpec, throughput_specs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, spec: Optional[OptSpec], images, labels, steps: int, warmup: int) -> dict:
    """Median forward+backward and optimizer.step() times; spec None times no step at all."""
    device = images.device
    opt = spec.make(model.parameters(), spec.lrs[1]) if spec else None
    if spec and spec.schedule_free:
        opt.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd, step_times = [], []
    for i in tqdm(range(warmup + steps), desc=spec.name if spec else "no step", leave=False):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        _sync(device)
        middle = time.perf_counter()
        if opt:
            opt.step()
        _sync(device)
        if i >= warmup:
            fwd_bwd.append(middle - start)
            step_times.append(time.perf_counter() - middle)
    row = dict(optimizer=spec.name if spec else "(forward + backward only)",
               fwd_bwd=float(np.median(fwd_bwd)), step=float(np.median(step_times)))
    row["peak_gib"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if device.type == "cuda" else "-"
    return row


def throughput(args, argv: list[str]) -> None:
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch_size or (128 if on_gpu else 2)
    steps = args.steps or (20 if on_gpu else 3)
    warmup = 5 if on_gpu else 1
    backend = warm_up_backend(device)
    torch.manual_seed(0)
    model = resnet50().to(device)
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    specs = throughput_specs(args.backends)
    rows = [time_steps(model, spec, images, labels, steps, warmup) for spec in [None, *specs]]
    lines = [f"`{shlex.join(['python', '-m', 'bench.train', *argv])}`: ResNet-50 (torchvision layout, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters in {len(list(model.parameters()))} "
             f"tensors), batch {batch} of {args.image_size}x{args.image_size} synthetic images, float32, "
             f"{device}, multilevel_hd backend {args.backends or repr(backend)}, median of {steps} steps after "
             f"{warmup} warm-up.", "",
             "| optimizer | images / s | step ms | optimizer.step() ms | optimizer share % | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        total = r["fwd_bwd"] + r["step"]
        lines.append(f"| {r['optimizer']} | {batch / total:.1f} | {1e3 * total:.1f} | {1e3 * r['step']:.1f} "
                     f"| {100 * r['step'] / total:.1f} | {r['peak_gib']} |")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"throughput_{device.type}.md").write_text(report + "\n")

