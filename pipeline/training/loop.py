"""The training loop, readable top to bottom.

1. build the network from the plan, initialise its head to the lesion prior, build focal + Dice loss
2. resume model / optimiser / scaler / epoch / RNG state from ``last.pt`` when asked
3. per epoch: lesion-aware patch batches from worker processes (started once for the whole run), AMP
   forward/backward, clipping, LR step
4. every ``val_every`` epochs (and at the end): sliding-window inference on the validation scans,
   lesion-level CPM (Dice secondary); the best checkpoint is kept by (CPM, Dice), the last always
4b. with ``train.time_budget_min``: the LR decay is compressed into the budget (progress = the larger of
   the step and the time fraction) and training ends when it is spent, possibly mid-epoch; that epoch is
   then validated and checkpointed like a last epoch (:mod:`pipeline.training.budget`)
5. per-epoch metrics go to a CSV (DVC plots) and to ``log_metrics`` (MLflow, rank 0 only)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.augment import anisotropic_axis
from pipeline.training.checkpoint import check_resume_compatible, load_checkpoint, save_checkpoint
from pipeline.training.budget import WallClockBudget
from pipeline.training.data import PatchBatches, PreprocessedCase, make_loader, resolve_num_workers
from pipeline.training.distributed import DistInfo, barrier
from pipeline.training.report import write_history_csv
from pipeline.training.schedule import learning_rate

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    operating_point: dict[str, float] | None = None
    stopped_by: str = "epochs"  # "epochs": all train.epochs ran; "time_budget": train.time_budget_min ended it
    steps: int = 0  # optimiser steps of the whole run (resumed parts included)
    elapsed_s: float = 0.0  # wall-clock seconds of the whole run (what the budget counts)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def amp_settings(amp: str, device: torch.device) -> tuple[bool, torch.dtype | None, bool]:
    """(enabled, dtype, needs GradScaler): bf16 where supported, else fp16 with a scaler; CUDA only."""
    if device.type != "cuda" or amp == "off":
        return False, None, False
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return True, torch.bfloat16, False
    return True, torch.float16, True


def check_patch_fits(patch_size, cases: list[PreprocessedCase]) -> None:
    largest = np.max([c.label.shape for c in cases], axis=0)
    if any(p > n for p, n in zip(patch_size, largest, strict=True)):
        raise ValueError(f"patch size {list(patch_size)} is larger than every preprocessed scan (largest extent "
                         f"{largest.tolist()} voxels); lower train.patch_size / preprocess.patch_size")


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.train.optim
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def one_hot_labels(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, 1, *spatial) integer labels -> contiguous (N, n_classes, *spatial) float32 one-hot."""
    shape = (target.shape[0], n_classes, *target.shape[2:])
    out = torch.zeros(shape, dtype=torch.float32, device=target.device)
    return out.scatter_(1, target.long(), 1.0)


def supervised_loss(loss_fn: nn.Module, output, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, focal, dice) over the deep-supervision heads at nnU-Net's weights.

    ``output``: (N, C, *spatial) logits, or a list of heads, full resolution first, each compared with the
    labels downsampled to its size (nearest neighbour, as nnU-Net), or MONAI's stacked (N, 1 + K, C,
    *spatial) heads. Weights ``2**-i`` normalised to sum 1 (:func:`pipeline.model.factory.deep_supervision_weights`;
    nnU-Net's lowest-resolution head, weight 0, is not built).

    ``target`` (N, 1, *spatial) labels are one-hot encoded once per head, contiguous, for every term:
    left to the loss terms, each encodes them again as a permuted (channels-last) view, and every
    elementwise op between that and the (N, C, ...) logits takes a slow strided path (measured on 2 CPU
    cores, forward + backward of the loss at 2 x 3 x 64 x 64 x 32: 32 ms that way, 23 ms this way).
    """
    from pipeline.model.factory import deep_supervision_weights, supervision_target

    if isinstance(output, (list, tuple)):
        heads = list(output)
    else:
        heads = list(torch.unbind(output, dim=1)) if output.ndim == 6 else [output]
    n_classes = heads[0].shape[1]
    encoded: dict[tuple[int, ...], torch.Tensor] = {}  # labels per head size, encoded once
    total = focal = dice = 0.0
    for w, head in zip(deep_supervision_weights(len(heads)), heads, strict=True):
        size = tuple(head.shape[2:])
        if size not in encoded:
            labels = supervision_target(target, size)
            if n_classes > 1 and labels.shape[1] == 1:  # a single-channel head takes its binary mask as is
                labels = one_hot_labels(labels, n_classes)
            encoded[size] = labels
        parts = loss_fn.parts(head.float(), encoded[size])
        total, focal, dice = total + w * parts.total, focal + w * parts.focal, dice + w * parts.dice
    return total, focal, dice  # type: ignore[return-value]


def train(cfg: Config, plan: dict[str, Any], train_cases: list[PreprocessedCase], val_cases: list[PreprocessedCase],
          out_dir: Path, resume: bool = False, progress: bool = True, dist_info: DistInfo = DistInfo(),
          log_metrics: Callable[[dict[str, float], int], None] | None = None,
          stop_after_steps: int | None = None) -> TrainResult:
    """Train and write ``last.pt`` / ``best.pt`` into ``out_dir`` (rank 0). See the module docstring."""
    from tqdm import tqdm

    from pipeline.losses import build_loss
    from pipeline.model.factory import build_model
    from pipeline.model.prior_init import init_prior_bias
    from pipeline.training.validate import validate

    tc = cfg.train
    device = resolve_device(tc.device)
    torch.manual_seed(cfg.seed + dist_info.rank)
    # determinism requested: cuDNN's deterministic kernels; otherwise let cuDNN autotune (benchmark) its
    # kernels for the fixed patch shape. Both only matter on CUDA; CPU runs are reproducible either way.
    torch.backends.cudnn.deterministic = tc.deterministic
    torch.backends.cudnn.benchmark = not tc.deterministic
    patch = tuple(tc.patch_size or plan["patch_size"])
    batch_size = tc.batch_size or plan["batch_size"]
    check_patch_fits(patch, train_cases)
    n_classes, in_channels = int(plan["n_classes"]), len(plan["channel_names"])
    lesion_labels = list(plan["lesion_labels"])

    model = build_model(tc.model, plan, in_channels, n_classes)
    if tc.model.prior_init:
        init_prior_bias(model, tc.model.prior_probability, tc.loss.mode, n_classes, lesion_labels)
    model.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    loss_fn = build_loss(tc.loss, n_classes)
    optimizer = build_optimizer(cfg, model)
    amp_on, amp_dtype, use_scaler = amp_settings(tc.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    history: list[dict[str, Any]] = []
    start_epoch, best_key, best_epoch, best_metrics, operating_point = 0, (-1.0, -1.0), -1, {}, None
    elapsed_before, steps_before = 0.0, 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    flat = cfg.flat()
    if resume and last_path.exists():
        state = load_checkpoint(last_path, device)
        check_resume_compatible(last_path, state["config_flat"], flat)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"].cpu())  # map_location moved it to `device`
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
        best_key, best_epoch = tuple(state["best_key"]), int(state["best_epoch"])
        best_metrics, operating_point = dict(state["best_metrics"]), state.get("operating_point")
        elapsed_before = float(state.get("elapsed_s", 0.0))  # the budget counts the earlier part too
        steps_before = int(state.get("steps", start_epoch * tc.steps_per_epoch))
        log.info("resumed from %s at epoch %d", last_path, start_epoch)
    elif resume:
        log.warning("--resume: %s does not exist; starting from scratch", last_path)
    budget = WallClockBudget(tc.time_budget_min, elapsed_before)

    net: nn.Module = model
    if dist_info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)

    aniso_axis = anisotropic_axis(plan)  # the plan's rule, not re-derived from the config
    dataset = PatchBatches(train_cases, patch, batch_size, tc.sampling, tc.augment, lesion_labels,
                           seed=cfg.seed, rank=dist_info.rank, anisotropic_axis=aniso_axis)
    spe = tc.steps_per_epoch
    total_steps = tc.epochs * spe
    warmup = tc.optim.warmup_epochs * spe
    # one loader iterator for the whole run: its worker processes start once (batch g of the stream is
    # step g % spe of epoch g // spe, as before), instead of being rebuilt and re-warmed every epoch
    dataset.set_stream(spe, start_epoch * spe, total_steps)
    workers = resolve_num_workers(tc.num_workers, dist_info.world_size)
    loader = make_loader(dataset, workers, pin_memory=device.type == "cuda")
    # iter() draws the workers' base seed from torch's global RNG; the batches do not use it (they are keyed
    # on (seed, epoch, rank, step)), so keep the RNG to training alone: a resumed run then continues the
    # uninterrupted run's RNG stream exactly
    rng_state = torch.get_rng_state()
    batches = iter(loader) if start_epoch < tc.epochs else iter(())
    torch.set_rng_state(rng_state)
    log.info("training: %d loader worker(s), %s", workers,
             f"time budget {tc.time_budget_min} min" if budget.enabled else "no time budget")

    def budget_fraction() -> float:
        """Fraction of the budget used; under DDP the largest over ranks, so all ranks stop together."""
        frac = budget.fraction()
        if budget.enabled and dist_info.enabled:
            t = torch.tensor([frac], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            frac = float(t.item())
        return frac

    def run_validation(epoch: int, row: dict[str, Any]) -> None:
        nonlocal best_key, best_epoch, best_metrics, operating_point
        t_val = time.perf_counter()
        val = validate(model, val_cases, plan, cfg, device, patch)
        budget.reserve_s = time.perf_counter() - t_val  # the final validation will take about as long
        row.update({f"val_{k}": v for k, v in val.metrics.items()})
        key = (val.metrics["cpm"], val.metrics["dice_lesion"])
        if key > best_key:
            best_key, best_epoch, best_metrics, operating_point = key, epoch + 1, dict(val.metrics), val.operating_point
            _save(best_path, model, optimizer, scaler, epoch, history + [row], cfg, plan, best_key, best_epoch,
                  best_metrics, operating_point, budget.elapsed_s(), steps_before + steps_done, stopped_by)

    steps_done, epochs_run, stopped_by = 0, start_epoch, "epochs"
    lr = 0.0
    if budget.enabled and budget_fraction() >= 1.0:  # resuming a run whose budget is already spent
        stopped_by, epochs_run = "time_budget", start_epoch
        log.info("time budget of %s min already spent; nothing to train", tc.time_budget_min)
    try:
        for epoch in range(start_epoch, tc.epochs if stopped_by == "epochs" else start_epoch):
            net.train()
            sums = {"loss": 0.0, "focal": 0.0, "dice_loss": 0.0}
            wait = compute = 0.0
            n = 0
            t_epoch = t_ready = time.perf_counter()
            bar = tqdm(total=spe, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step",
                       disable=not (progress and dist_info.is_main), leave=False)
            for step in range(spe):
                # every epoch runs at least one step; then the budget can end it mid-epoch
                frac = budget_fraction() if budget.enabled else 0.0
                if step > 0 and frac >= 1.0:
                    stopped_by = "time_budget"
                    break
                batch = next(batches)
                t_got = time.perf_counter()
                wait += t_got - t_ready
                lr = learning_rate(epoch * spe + step, total_steps, tc.optim.lr, tc.optim.schedule, warmup,
                                   time_fraction=frac)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                image = batch["image"].to(device, non_blocking=True)
                target = batch["label"].to(device, non_blocking=True)
                if tc.channels_last:
                    image = image.contiguous(memory_format=torch.channels_last_3d)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype) if amp_on else nullcontext():
                    output = net(image)
                total, focal, dice = supervised_loss(loss_fn, output, target)
                scaler.scale(total).backward()
                if tc.optim.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), tc.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                sums["loss"] += float(total.detach())
                sums["focal"] += float(focal.detach())
                sums["dice_loss"] += float(dice.detach())
                t_ready = time.perf_counter()
                compute += t_ready - t_got
                n += 1
                bar.update()
                bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
                steps_done += 1
                if stop_after_steps is not None and steps_done >= stop_after_steps:
                    raise KeyboardInterrupt(f"stopped after {steps_done} steps (test hook)")
            bar.close()
            epochs_run = epoch + 1
            if budget.enabled and budget_fraction() >= 1.0:
                stopped_by = "time_budget"
            if dist_info.enabled:  # log the mean loss over every rank's batches, not rank 0's alone
                keys = ("loss", "focal", "dice_loss")
                totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)  # NCCL: on device
                torch.distributed.all_reduce(totals)
                sums = dict(zip(keys, (totals / dist_info.world_size).tolist(), strict=True))
            elapsed = time.perf_counter() - t_epoch
            row: dict[str, Any] = {"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}, "lr": lr, "steps": n,
                                   "patches_per_s": n * batch_size * dist_info.world_size / max(elapsed, 1e-9),
                                   "data_wait_fraction": wait / max(wait + compute, 1e-9), "epoch_time_s": elapsed}
            if device.type == "cuda":
                row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9

            # validate on schedule, and always at the end (the last epoch, or the budget's end)
            final = epoch + 1 == tc.epochs or stopped_by == "time_budget"
            if dist_info.is_main and val_cases and ((epoch + 1) % tc.val_every == 0 or final):
                run_validation(epoch, row)
            history.append(row)
            if dist_info.is_main:
                log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
                if log_metrics:
                    log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, epoch + 1)
                write_history_csv(out_dir / "train_log.csv", history)  # live progress for `dvc plots` / tail
                if (epoch + 1) % tc.checkpoint_every == 0 or final:
                    _save(last_path, model, optimizer, scaler, epoch, history, cfg, plan, best_key, best_epoch,
                          best_metrics, operating_point, budget.elapsed_s(), steps_before + steps_done, stopped_by)
            barrier(dist_info)
            if stopped_by == "time_budget":
                log.info("time budget of %s min reached after %d steps (epoch %d of %d)", tc.time_budget_min,
                         steps_before + steps_done, epoch + 1, tc.epochs)
                break
    finally:
        del batches  # ends the loader's worker processes

    # no validation scans: the last model is the best (overwrite: a best.pt left by an earlier run is stale)
    if dist_info.is_main and (not val_cases or not best_path.exists()):
        best_epoch = epochs_run
        _save(best_path, model, optimizer, scaler, epochs_run - 1, history, cfg, plan, best_key, best_epoch,
              best_metrics, operating_point, budget.elapsed_s(), steps_before + steps_done, stopped_by)
    return TrainResult(best_epoch, best_metrics, history, operating_point, stopped_by=stopped_by,
                       steps=steps_before + steps_done, elapsed_s=budget.elapsed_s())


def _save(path: Path, model, optimizer, scaler, epoch, history, cfg: Config, plan, best_key, best_epoch,
          best_metrics, operating_point, elapsed_s: float = 0.0, steps: int = 0, stopped_by: str = "epochs") -> None:
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "epoch": epoch, "torch_rng": torch.get_rng_state(), "history": history,
        "config": cfg.to_dict(), "config_flat": cfg.flat(), "plan": plan,
        "best_key": list(best_key), "best_epoch": best_epoch, "best_metrics": best_metrics,
        "operating_point": operating_point,
        "elapsed_s": elapsed_s, "steps": steps, "stopped_by": stopped_by,  # wall-clock budget bookkeeping
    })
