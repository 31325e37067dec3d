"""Benchmark one training step (forward, loss, backward, optimiser step) of candidate networks on the CPU.

The numbers behind the CPU plan in docs/model.md: how much a full-resolution first stage, two convolutions
per stage and the width cost per step, so that the CPU plan (``preprocess.cpu_base_filters`` /
``cpu_max_filters`` / ``cpu_budget_mvoxels``) can be chosen for the default run's time budget.

Each candidate is ``name:base:max:X,Y,Z:batch`` (``name`` = ``dynunet`` with deep supervision, ``unet``,
or ``old_unet`` = the previous default: MONAI UNet 16..256, one residual unit per level, the plan's first
stride applied at the input convolution, no full-resolution stage). Topology from the plan's rule
(:func:`pipeline.preprocessing.plan.network_topology`) at ``--spacing`` (default: the synthetic data's
0.8 x 0.8 x 2.5 mm). Loss: our focal + Dice (``build_loss`` defaults) through ``supervised_loss`` (deep
supervision heads against downsampled labels); optimiser: SGD Nesterov. Random inputs, one lesion cube.
Reported: parameters and the median of ``--steps`` timed steps after ``--warmup`` steps, with
``torch.set_num_threads(--threads)``, for each ``--amp`` precision (``off``: float32; ``bf16``: the
training loop's CPU autocast, :func:`pipeline.model.device.autocast`), plus the median forward pass in
evaluation mode without gradients (one sliding-window batch of inference) and the float32 / bf16 ratios.

Usage::

    flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_network.py            # the default candidates
    flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_network.py --candidates dynunet:8:128:80,96,16:2 \
        --channels 2 --spacing 0.72 0.72 3 --amp off bf16 --steps 8                 # MS CPU plan, bf16 vs float32
    .venv/bin/python benchmarks/bench_network.py --candidates dynunet:8:128:64,80,24:2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_CANDIDATES = (  # the default CPU plan's patch for the synthetic data, then 64^3 (GOTCHAS' figures)
    "old_unet:16:256:64,80,24:2",
    "unet:8:128:64,80,24:2",
    "dynunet:32:320:64,80,24:2",
    "dynunet:16:256:64,80,24:2",
    "dynunet:8:128:64,80,24:2",
    "dynunet:32:320:64,64,64:2",
    "dynunet:16:320:64,64,64:2",
    "dynunet:8:128:64,64,64:2",
)


def build(name: str, base: int, top: int, patch: tuple[int, int, int], spacing: tuple[float, float, float],
          channels: int = 1):
    from monai.networks.nets import UNet

    from pipeline.config import ModelConfig
    from pipeline.model.factory import build_model, stage_filters
    from pipeline.preprocessing.plan import DEFAULT_MAX_STAGES, network_topology

    topo = network_topology(patch, spacing, DEFAULT_MAX_STAGES)
    filters = stage_filters(base, top, len(topo["strides"]))
    if name == "old_unet":  # the previous default, first stride at the input conv (MONAI issue #1258)
        return UNet(spatial_dims=3, in_channels=channels, out_channels=3, channels=filters,
                    strides=[tuple(s) for s in topo["strides"][1:]], num_res_units=1, norm="INSTANCE")
    network = {"strides": topo["strides"], "kernel_sizes": topo["kernel_sizes"], "filters": filters,
               "pools_per_axis": topo["pools"]}
    cfg = ModelConfig(name=name, base_filters=base, max_filters=top, num_res_units=0)
    return build_model(cfg, network, channels, 3)


def time_steps(model, patch, batch: int, warmup: int, steps: int, channels: int = 1,
               amp: str = "off") -> list[float]:
    import torch

    from pipeline.config import LossConfig
    from pipeline.losses import build_loss
    from pipeline.model.device import amp_dtype, autocast
    from pipeline.training.loop import supervised_loss

    cpu = torch.device("cpu")
    dtype = amp_dtype(amp, cpu)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, channels, *patch, generator=g)
    label = torch.zeros(batch, 1, *patch, dtype=torch.long)
    label[:, :, 8:16, 8:16, 4:10] = 2
    label[:, :, 20:40, 20:40, :] = torch.where(label[:, :, 20:40, 20:40, :] == 0, 1, 2)
    loss_fn = build_loss(LossConfig(), 3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    model.train()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(cpu, dtype):
            output = model(image)
        total, _, _ = supervised_loss(loss_fn, output, label)
        total.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_forward(model, patch, batch: int, warmup: int, steps: int, channels: int = 1,
                 amp: str = "off") -> list[float]:
    """Seconds per evaluation-mode forward pass without gradients (as sliding-window inference runs)."""
    import torch

    from pipeline.model.device import amp_dtype, autocast

    cpu = torch.device("cpu")
    dtype = amp_dtype(amp, cpu)
    image = torch.randn(batch, channels, *patch, generator=torch.Generator().manual_seed(0))
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            with autocast(cpu, dtype):
                model(image).float()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    model.train()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--channels", type=int, default=1, help="input channels")
    ap.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16"],
                    help="precisions to time (bf16: CPU autocast)")
    ap.add_argument("--json", type=Path, help="append one JSON line per candidate to this file")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from pipeline.model.device import cpu_has_native_bf16

    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}, "
          f"{platform.processor() or platform.machine()}, native bf16: {cpu_has_native_bf16()}")
    # one untimed step first: the process's first step pays one-off costs (allocator, kernels, imports)
    time_steps(build("dynunet", 4, 16, (32, 32, 16), tuple(args.spacing)), (32, 32, 16), 1, 1, 0)
    print("| network | filters | patch x batch | parameters | precision | s / step (median) | "
          "s / forward, eval (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.candidates:
        name, base, top, patch_txt, batch = spec.split(":")
        patch = tuple(int(n) for n in patch_txt.split(","))
        medians = {}
        for amp in args.amp:
            torch.manual_seed(0)
            model = build(name, int(base), int(top), patch, tuple(args.spacing), args.channels)
            n_params = sum(p.numel() for p in model.parameters())
            times = time_steps(model, patch, int(batch), args.warmup, args.steps, args.channels, amp)
            fwd = time_forward(model, patch, int(batch), args.warmup, args.steps, args.channels, amp)
            medians[amp] = (statistics.median(times), statistics.median(fwd))
            print(f"| {name} | {base}..{top} | {'x'.join(map(str, patch))} x {batch} | {n_params / 1e6:.2f} M | "
                  f"{amp} | {medians[amp][0]:.3f} | {medians[amp][1]:.3f} |", flush=True)
            if args.json:
                with args.json.open("a") as fh:
                    fh.write(json.dumps({"candidate": spec, "amp": amp, "params": n_params, "step_s": times,
                                         "median_s": medians[amp][0], "forward_s": fwd,
                                         "threads": args.threads, "load_avg": os.getloadavg()[0]}) + "\n")
        if "off" in medians and "bf16" in medians:
            off, bf = medians["off"], medians["bf16"]
            print(f"| {name} | float32 / bf16 | | | ratio | {off[0] / bf[0]:.2f}x | {off[1] / bf[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
