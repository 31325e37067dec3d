"""One-shot GPU benchmark of the default GPU plan (issue 16): step time and share of peak, data wait,
sliding-window throughput against MONAI, peak GPU memory, in one bounded run.

What it does, in order (``--max-seconds`` bounds the whole run; the phases get shares of what is left):

1. **Data and plan** (not timed): ``--cases`` synthetic CT-like scans (:mod:`pipeline.data.synthetic`, the
   config's ``data.synthetic``) written in the MSD layout into a temporary folder, fingerprinted
   (:func:`~pipeline.preprocessing.fingerprint.compute_fingerprint`) and planned with
   ``preprocess.memory_budget: gpu`` (:func:`~pipeline.preprocessing.plan.make_plan`: nnU-Net's 32..320
   filters, patch and batch from ``gpu_budget_gb``), then every scan preprocessed in memory
   (:func:`~pipeline.preprocessing.transform.preprocess_case`).
2. **Training step**, with the training loop's own pieces (:mod:`pipeline.training.loop`): the network and
   loss from the plan and ``train.model`` / ``train.loss`` (``_build_network``: head prior-initialised),
   the batch stream (``_open_batches``: :class:`~pipeline.training.data.PatchBatches`, lesion-aware sampler
   and our augmentation, ``train.num_workers`` loader workers resolved as training does) and the step
   (``_step``: focal + Dice over the deep-supervision heads, the configured optimiser, gradient clipping);
   AMP as the loop sets it (``amp_settings("auto")``: bf16 where supported, else fp16 with a GradScaler;
   bf16 on a CPU only where it has native bf16). One step under ``FlopCounterMode`` counts the FLOPs of
   forward + loss + backward (matmul / convolution FLOPs, the usual "model FLOPs"); ``--warmup`` steps
   (cuDNN autotuning) follow, then up to ``--steps`` timed steps, each ended by a device synchronise.

   * step time = median over the timed steps of the compute time (batch on hand -> step done, H2D copy
     included), seconds;
   * share of peak (MFU) = FLOPs per step / step time / device peak, the peak from :data:`PEAK_TFLOPS`
     (bf16 dense tensor-core TFLOP/s by ``torch.cuda.get_device_name()``) or ``--peak-tflops``;
   * data-wait fraction = sum(wait) / sum(wait + compute), the training loop's ``data_wait_fraction``, where
     wait = time blocked in ``next(loader)``; also over the second half of the timed steps alone, since the
     workers start with up to 4 batches each made ahead while the first steps autotune.

3. **Sliding-window inference** on one random ``(C, *--infer-shape)`` volume (default twice the patch per
   axis; content does not change the speed), with the config's ``inference`` overlap / ``sw_batch_size`` /
   blend / AMP and no TTA:

   * ``ours``: :func:`pipeline.inference.sliding_window.predict_probabilities` as prediction and validation
     call it (windows on the device, blended class probabilities accumulated on the host);
   * ``ours_device_out`` (CUDA only): the same with ``out_device`` = the GPU, to separate the cost of
     host accumulation;
   * ``monai``: the MONAI tutorial call, ``monai.inferers.sliding_window_inference(x, roi, sw_batch_size,
     model, overlap, mode)`` on the device input under the same autocast, softmax after.

   One untimed warm-up round, then rounds (each variant once, in alternation) until ``--infer-rounds`` or the
   time share is spent; voxels/s = volume voxels / median seconds (input upload and output included).

4. **Peak GPU memory**: ``torch.cuda.max_memory_allocated`` over the training phase and over inference
   (reset between them), GB (1e9 bytes); ``null`` on CPU.

Output: a table on stdout and, with ``--out``, the JSON (written atomically).

Usage::

    .venv/bin/python benchmarks/bench_gpu.py --out /tmp/bench_gpu.json            # CUDA machine, < 5 min
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --tiny --out /tmp/g.json  # CPU smoke, ~20 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent

# bf16 dense (no sparsity) tensor-core peak, TFLOP/s, from the vendors' data sheets; first match wins, so
# the PCIe / NVL variants precede their SXM names and "A100" / "L40" precede "A10" / "L4" (word boundaries)
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*PCIe", 756.0, "H100 PCIe bf16 dense"),
    (r"H[12]00.*NVL", 835.0, "H100/H200 NVL bf16 dense"),
    (r"\bH100\b", 989.0, "H100 SXM bf16 dense"),
    (r"\bH200\b", 989.0, "H200 SXM bf16 dense"),
    (r"\bA100\b", 312.0, "A100 bf16 dense"),
    (r"\bL4\b", 121.0, "L4 bf16 dense"),
    (r"\bA10\b", 125.0, "A10 bf16 dense"),
    (r"\bV100\b", 125.0, "V100 fp16 tensor core (no bf16)"),
    (r"RTX 4090", 165.0, "RTX 4090 bf16 dense, fp32 accumulate"),
)

TINY_OVERRIDES = (  # a network and data small enough for a CPU smoke run in seconds
    "data.synthetic.shape=[40,40,16]",
    "train.model.base_filters=4",
    "train.model.max_filters=16",
    "train.model.depth=4",
    "inference.sw_batch_size=2",
)


# ----------------------------------------------------------------------------------------------- device


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """(peak bf16 dense TFLOP/s, which table entry) for a ``torch.cuda.get_device_name()`` string;
    (None, "peak unknown") when no entry matches (e.g. ``"cpu"``)."""
    for pattern, tflops, what in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops, what
    return None, "peak unknown"


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: --device cuda but torch sees no CUDA device")
    return torch.device(name)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Deadline:
    """The run's wall-clock bound: ``share(f)`` = the time ``f`` of what is left from now, as a deadline."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def share(self, fraction: float) -> float:
        return time.perf_counter() + max(0.0, self.left()) * fraction


# ----------------------------------------------------------------------------------------------- setup


def load_bench_config(args: argparse.Namespace):
    """The project config with the benchmark's overrides: the GPU plan, ``--tiny``, ``--set``."""
    from pipeline.config import load_config

    overrides = ["preprocess.memory_budget=gpu", f"data.synthetic.n_cases={args.cases}" if args.cases else None]
    overrides = [o for o in overrides if o] + (list(TINY_OVERRIDES) if args.tiny else []) + list(args.set)
    return load_config(args.config, overrides)


def make_cases(cfg, root: Path) -> tuple[Any, dict[str, Any], list]:
    """Synthetic scans -> fingerprint -> GPU plan -> preprocessed cases in memory.

    Returns:
        ``(plan, plan_json, cases)``: the plan as :func:`make_plan` returns it (what the training loop takes),
        its JSON dict (what ``plan.json`` holds; the benchmark reads its figures from it) and every scan as a
        :class:`~pipeline.training.data.PreprocessedCase` (image ``(C, x, y, z)`` float32, label
        ``(x, y, z)`` uint8).
    """
    from pipeline.data.synthetic import write_synthetic_dataset
    from pipeline.io.dataset import load_dataset
    from pipeline.preprocessing.cases import load_case
    from pipeline.preprocessing.fingerprint import compute_fingerprint
    from pipeline.preprocessing.plan import make_plan
    from pipeline.preprocessing.transform import preprocess_case
    from pipeline.training.data import PreprocessedCase

    raw = write_synthetic_dataset(root / "raw", cfg.data.synthetic, progress=False)
    dataset = load_dataset(cfg.data, raw)
    ids = [c.case_id for c in dataset.training]
    fingerprint = compute_fingerprint(dataset, ids, cfg.data, workers=1)
    planned = make_plan(fingerprint, dataset, cfg)
    plan = json.loads(json.dumps(_as_json(planned)))  # exactly what plan.json holds
    spacing = tuple(float(s) for s in plan["target_spacing_mm"])
    remap = dict(cfg.data.label_remap) or None
    cases = []
    for cid in ids:
        image, label = load_case(dataset.case(cid), remap, int(plan["n_classes"]))
        img, lab, _ = preprocess_case(image, label, planned, cfg.preprocess)
        img, lab = _array(img), _array(lab)
        cases.append(PreprocessedCase(cid, img, lab.reshape(lab.shape[-3:]), spacing))  # type: ignore[arg-type]
    return planned, plan, cases


def _as_json(obj: Any) -> Any:
    """A typed hand-off (``to_dict()``) or a plain dict, as its JSON-able dict."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def _array(obj: Any):
    """A :class:`~pipeline.io.volume.Volume`'s array, or the array itself."""
    import numpy as np

    return np.ascontiguousarray(getattr(obj, "data", obj))


def bench_config(cfg, args: argparse.Namespace, total_steps: int):
    """``cfg`` with one epoch of ``total_steps`` steps (the loader's stream) and ``--workers`` if given."""
    update: dict[str, Any] = {"epochs": 1, "steps_per_epoch": total_steps}
    if args.workers is not None:
        update["num_workers"] = args.workers
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


# ----------------------------------------------------------------------------------------------- training


def bench_training(cfg, planned: Any, plan: dict[str, Any], cases: list, device, args: argparse.Namespace,
                   until: float) -> tuple[dict[str, Any], Any]:
    """FLOPs of one step, then ``args.warmup`` + up to ``args.steps`` timed steps (stopping at ``until``).

    ``planned``: the plan as the loop takes it; ``plan``: its JSON dict (patch and batch size read here).

    Every piece is the training loop's own: the network and loss (``_build_network``), the batch stream and
    its worker processes (``_open_batches``), AMP, optimiser and scaler as ``train()`` sets them, and the
    step (``_step``). Returns ``(figures, model)``.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.training.distributed import DistInfo
    from pipeline.training.loop import Trainee, _build_network, _open_batches, _step, amp_settings, build_optimizer

    total_steps = 1 + args.warmup + args.steps
    cfg = bench_config(cfg, args, total_steps)
    tc = cfg.train
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.deterministic = tc.deterministic
    torch.backends.cudnn.benchmark = not tc.deterministic  # as the loop: autotune for the fixed patch
    patch = tuple(tc.patch_size or plan["patch_size"])
    batch_size = int(tc.batch_size or plan["batch_size"])
    model, loss_fn = _build_network(cfg, planned, device)
    autocast_dtype, use_scaler = amp_settings("auto" if args.amp == "on" else "off", device)
    # the LR stays at its peak value: the schedule does not change the cost of a step
    run = Trainee(model=model, net=torch.compile(model) if tc.compile else model, loss_fn=loss_fn,
                  optimizer=build_optimizer(cfg, model), scaler=torch.amp.GradScaler("cuda", enabled=use_scaler),
                  device=device, amp_dtype=autocast_dtype)

    model.train()
    reset_peak_memory(device)
    waits: list[float] = []
    computes: list[float] = []
    t_first = time.perf_counter()
    batches, workers = _open_batches(cfg, planned, cases, patch, batch_size, 0, DistInfo(), device)
    try:
        # step 0: FLOP count (the convolutions / matmuls of forward, loss and backward; FlopCounterMode counts
        # no elementwise op: norms, activations and the optimiser update are left out, as in MFU figures)
        batch = next(batches)
        counter = FlopCounterMode(display=False)
        with counter:
            _step(run, cfg, batch, tc.optim.lr)
        synchronize(device)
        flops = int(counter.get_total_flops())
        first_step_s = time.perf_counter() - t_first  # worker start + first batch + counted step
        for i in range(args.warmup + args.steps):
            if i >= args.warmup + 1 and time.perf_counter() >= until:
                break  # at least one timed step, then the wall-clock share decides
            t_ready = time.perf_counter()
            batch = next(batches)
            t_got = time.perf_counter()
            _step(run, cfg, batch, tc.optim.lr)
            synchronize(device)
            t_done = time.perf_counter()
            if i >= args.warmup:
                waits.append(t_got - t_ready)
                computes.append(t_done - t_got)
    finally:
        del batches  # ends the loader's worker processes
    step_s = statistics.median(computes)
    half = len(computes) // 2
    busy = sum(waits) + sum(computes)
    return {
        "patch_size": list(patch),
        "batch_size": batch_size,
        "workers": workers,
        "amp_dtype": str(autocast_dtype).replace("torch.", "") if autocast_dtype is not None else "off",
        "flops_per_step": flops,
        "steps_timed": len(computes),
        "warmup_steps": args.warmup,
        "first_step_s": first_step_s,
        "step_time_s": step_s,
        "step_time_mean_s": statistics.fmean(computes),
        "wall_per_step_s": busy / len(computes),
        "data_wait_fraction": wait_fraction(waits, computes),
        # the loader starts with up to 4 x workers batches made ahead (during the counted and warm-up steps);
        # the second half of the timed steps shows the steady state once that stock is used up
        "data_wait_fraction_second_half": wait_fraction(waits[half:], computes[half:]),
        "patches_per_s": batch_size * len(computes) / busy,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_gpu_memory_gb": peak_memory_gb(device),
    }, model


def wait_fraction(waits: list[float], computes: list[float]) -> float:
    """sum(wait) / sum(wait + compute), in [0, 1]; 0 for no steps."""
    busy = sum(waits) + sum(computes)
    return sum(waits) / busy if busy > 0 else 0.0


# ----------------------------------------------------------------------------------------------- inference


def bench_inference(cfg, plan: dict[str, Any], model, device, args: argparse.Namespace, patch,
                    until: float) -> dict[str, Any]:
    """Ours against MONAI's ``sliding_window_inference`` on one random volume (see the module docstring)."""
    import torch
    from monai.inferers import sliding_window_inference

    from pipeline.inference.sliding_window import predict_probabilities
    from pipeline.model.device import amp_dtype, autocast

    inf = cfg.inference.model_copy(update={"tta_mirror": False})
    shape = tuple(args.infer_shape) if args.infer_shape else tuple(2 * int(p) for p in patch)
    gen = torch.Generator().manual_seed(cfg.seed)
    image = torch.randn((len(plan["channel_names"]), *shape), generator=gen)
    mode = cfg.train.loss.mode
    model.eval()
    # the autocast predict_probabilities applies (inference.amp), so MONAI runs under the same precision
    inf_dtype = amp_dtype("auto" if inf.amp else "off", device)

    def ours() -> torch.Tensor:
        return predict_probabilities(model, image, patch, inf, mode, device)  # host accumulation (default)

    def ours_device_out() -> torch.Tensor:
        return predict_probabilities(model, image, patch, inf, mode, device, out_device=device)

    @torch.no_grad()
    def monai() -> torch.Tensor:
        x = image[None].to(device)
        with autocast(device, inf_dtype):
            logits = sliding_window_inference(x, roi_size=tuple(patch), sw_batch_size=inf.sw_batch_size,
                                              predictor=model, overlap=inf.overlap, mode=inf.blend)
        return torch.softmax(logits.float(), dim=1) if mode == "softmax" else torch.sigmoid(logits.float())

    variants = {"ours": ours, "monai": monai}
    if device.type == "cuda":
        variants["ours_device_out"] = ours_device_out
    times: dict[str, list[float]] = {name: [] for name in variants}
    reset_peak_memory(device)
    for rnd in range(args.infer_rounds + 1):  # round 0: warm-up (cuDNN autotuning for the window shape)
        if rnd >= 2 and time.perf_counter() >= until:
            break
        for name, fn in variants.items():
            synchronize(device)
            t0 = time.perf_counter()
            out = fn()
            synchronize(device)
            if rnd > 0:
                times[name].append(time.perf_counter() - t0)
            del out
    voxels = math.prod(shape)
    result: dict[str, Any] = {
        "volume_shape": [len(plan["channel_names"]), *shape],
        "roi_size": list(patch),
        "overlap": inf.overlap,
        "sw_batch_size": inf.sw_batch_size,
        "blend": inf.blend,
        "amp_dtype": str(inf_dtype).replace("torch.", "") if inf_dtype is not None else "off",
        "tta_mirror": False,
        "rounds_timed": len(times["ours"]),
        "peak_gpu_memory_gb": peak_memory_gb(device),
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"seconds": med, "voxels_per_s": voxels / med, "all_seconds": ts}
    result["ours_vs_monai"] = result["ours"]["voxels_per_s"] / result["monai"]["voxels_per_s"]
    return result


# ----------------------------------------------------------------------------------------------- report


def device_info(device, override: float | None) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    peak, source = peak_tflops(name) if device.type == "cuda" else (None, "peak unknown")
    if override is not None:
        peak, source = float(override), "--peak-tflops"
    return {"type": device.type, "name": name, "peak_tflops": peak, "peak_source": source,
            "torch_threads": torch.get_num_threads()}


def format_table(result: dict[str, Any]) -> str:
    """The headline figures as a markdown table."""
    dev, tr, inf = result["device"], result["train"], result["inference"]
    share = result["share_of_peak"]
    mem = result["peak_gpu_memory_gb"]
    rows = [
        ("device", dev["name"] if dev["type"] == "cpu" else f"{dev['name']} ({dev['type']})"),
        ("plan", f"patch {'x'.join(map(str, tr['patch_size']))} x batch {tr['batch_size']}, filters "
                 f"{result['plan']['filters']}, {result['plan']['n_params'] / 1e6:.2f} M parameters"),
        ("training step (median)", f"{tr['step_time_s'] * 1e3:.1f} ms (amp {tr['amp_dtype']}, "
                                   f"{tr['steps_timed']} timed steps after {tr['warmup_steps']} warm-up)"),
        ("FLOPs per step (fwd + bwd)", f"{tr['flops_per_step'] / 1e9:,.1f} GFLOP"),
        ("achieved", f"{tr['achieved_tflops']:.2f} TFLOP/s"),
        ("share of device peak", "peak unknown" if share is None
         else f"{100 * share:.1f} % of {dev['peak_tflops']:g} TFLOP/s ({dev['peak_source']})"),
        ("data-wait fraction", f"{tr['data_wait_fraction']:.3f}, second half of the steps "
                               f"{tr['data_wait_fraction_second_half']:.3f} ({tr['workers']} loader worker(s), "
                               f"{tr['patches_per_s']:.1f} patches/s)"),
        ("sliding window, ours", f"{inf['ours']['voxels_per_s'] / 1e6:.2f} Mvoxel/s "
                                 f"({inf['ours']['seconds']:.3f} s for {'x'.join(map(str, inf['volume_shape']))})"),
        ("sliding window, MONAI", f"{inf['monai']['voxels_per_s'] / 1e6:.2f} Mvoxel/s "
                                  f"({inf['monai']['seconds']:.3f} s)"),
    ]
    if "ours_device_out" in inf:
        rows.append(("sliding window, ours (GPU output)",
                     f"{inf['ours_device_out']['voxels_per_s'] / 1e6:.2f} Mvoxel/s"))
    rows += [
        ("ours / MONAI (voxels/s)", f"{inf['ours_vs_monai']:.2f}x (roi {'x'.join(map(str, inf['roi_size']))}, "
                                    f"overlap {inf['overlap']}, {inf['blend']}, sw_batch {inf['sw_batch_size']}, "
                                    f"amp {inf['amp_dtype']}, no TTA)"),
        ("peak GPU memory", "n/a (CPU)" if mem is None
         else f"{mem:.2f} GB (training {tr['peak_gpu_memory_gb']:.2f}, "
              f"inference {inf['peak_gpu_memory_gb']:.2f})"),
        ("wall clock", f"{result['wall_s']:.1f} s (setup {result['setup_s']:.1f} s, "
                       f"bound {result['max_seconds']:g} s)"),
    ]
    lines = ["| measure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "params.yaml"), help="params file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--tiny", action="store_true",
                   help="tiny scans and network, few steps: a CPU smoke run (with --device cpu)")
    p.add_argument("--cases", type=int, default=None,
                   help="synthetic scans (default: data.synthetic.n_cases; --tiny: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the FLOP-count step (10; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps at most (200; tiny 3)")
    p.add_argument("--infer-rounds", type=int, default=None, help="timed inference rounds at most (5; tiny 1)")
    p.add_argument("--infer-shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="inference volume (default: 2 x patch per axis)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: train.num_workers)")
    p.add_argument("--amp", choices=("on", "off"), default="on",
                   help="training autocast: on = bf16 where supported, else fp16 (CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s (overrides the table)")
    p.add_argument("--max-seconds", type=float, default=240.0, help="wall-clock bound of the whole run")
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args(argv)
    small = args.tiny
    args.cases = args.cases or (3 if small else None)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 10)
    args.steps = args.steps if args.steps is not None else (3 if small else 200)
    args.infer_rounds = args.infer_rounds if args.infer_rounds is not None else (1 if small else 5)
    if args.steps < 1 or args.infer_rounds < 1 or args.warmup < 0:
        p.error("--steps and --infer-rounds must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.max_seconds)
    import monai
    import torch

    from pipeline.io.atomic import write_json

    device = resolve_device(args.device)
    cfg = load_bench_config(args)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        planned, plan, cases = make_cases(cfg, Path(tmp))
    setup_s = time.perf_counter() - deadline.start

    train, model = bench_training(cfg, planned, plan, cases, device, args, until=deadline.share(0.55))
    inference = bench_inference(cfg, plan, model, device, args, tuple(train["patch_size"]),
                                until=deadline.share(0.9))
    dev = device_info(device, args.peak_tflops)
    peak = dev["peak_tflops"]
    mems = [m for m in (train["peak_gpu_memory_gb"], inference["peak_gpu_memory_gb"]) if m is not None]
    wall = time.perf_counter() - deadline.start
    result = {
        "benchmark": "bench_gpu",
        "command": " ".join(["bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny,
        "device": dev,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
                     "cuda": torch.version.cuda},
        "load_average": list(os.getloadavg()),
        "plan": {"budget": plan["budget"], "patch_size": plan["patch_size"], "batch_size": plan["batch_size"],
                 "filters": network_filters(model), "strides": plan["network"]["strides"],
                 "kernel_sizes": plan["network"]["kernel_sizes"], "median_shape": plan["median_shape"],
                 "target_spacing_mm": plan["target_spacing_mm"], "n_cases": len(cases),
                 "n_params": sum(p.numel() for p in model.parameters())},
        "train": train,
        "share_of_peak": train["achieved_tflops"] / peak if peak else None,
        "inference": inference,
        "peak_gpu_memory_gb": max(mems) if mems else None,
        "setup_s": setup_s,
        "wall_s": wall,
        "max_seconds": args.max_seconds,
        "within_bound": wall <= args.max_seconds,
    }
    print(format_table(result))
    if not result["within_bound"]:
        print(f"note: the run took {wall:.0f} s, over --max-seconds {args.max_seconds:g} (setup or the minimum "
              "of one timed step / round ran past it)", file=sys.stderr)
    if args.out:
        write_json(args.out, result)
    return 0


def network_filters(model) -> list[int]:
    """Filters per stage of the network built (MONAI ``DynUNet.filters`` / ``UNet.channels``)."""
    return [int(f) for f in getattr(model, "filters", None) or getattr(model, "channels", ())]


if __name__ == "__main__":
    sys.exit(main())
