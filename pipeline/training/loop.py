"""The training loop, readable top to bottom.

1. build the network from the plan, initialise its head to the lesion prior, build focal + Dice loss
2. resume model / optimiser / scaler / epoch / RNG state from ``last.pt`` when asked
3. per epoch: lesion-aware patch batches from worker processes (started once for the whole run), AMP
   forward/backward, clipping, LR step
4. every ``val_every`` epochs (and at the end): sliding-window inference on the validation scans,
   lesion-level CPM (Dice secondary); the best checkpoint is kept by (CPM, Dice), the last always. Under DDP
   every rank validates its share of the scans and the per-scan results are gathered
   (:func:`pipeline.training.validate.validate_distributed`): the same metrics on every rank
4b. with ``train.time_budget_min``: the LR decay is compressed into the budget (progress = the larger of
   the step and the time fraction) and training ends when it is spent, possibly mid-epoch; that epoch is
   then validated and checkpointed like a last epoch (:mod:`pipeline.training.budget`)
5. per-epoch metrics go to a CSV (DVC plots) and to ``log_metrics`` (MLflow, rank 0 only)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.contracts import OperatingPoint, Plan, operating_point_or_none
from pipeline.losses.probability import one_hot
from pipeline.model.checkpoint import (
    CheckpointError,
    best_checkpoint,
    check_resume_compatible,
    last_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.model.device import amp_dtype, autocast, resolve_device
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
    operating_point: OperatingPoint | None = None
    stopped_by: str = "epochs"  # "epochs": all train.epochs ran; "time_budget": train.time_budget_min ended it
    steps: int = 0  # optimiser steps of the whole run (resumed parts included)
    elapsed_s: float = 0.0  # wall-clock seconds of the whole run (what the budget counts)


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, needs GradScaler): the dtype of :func:`~pipeline.model.device.amp_dtype`
    (CUDA bf16 or fp16; bf16 on a CPU with native bf16); only fp16 needs a gradient scaler."""
    dtype = amp_dtype(amp, device)
    return dtype, dtype == torch.float16


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


def supervised_loss(loss_fn: nn.Module, output,
                    target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
                labels = one_hot(labels, n_classes)
            encoded[size] = labels
        parts = loss_fn.parts(head.float(), encoded[size])
        total, focal, dice = total + w * parts.total, focal + w * parts.focal, dice + w * parts.dice
    return total, focal, dice  # type: ignore[return-value]


@dataclass
class Selection:
    """Model selection so far: the best validation key ``(CPM, lesion Dice)``, its epoch (1-based; -1
    before any validation), its metrics and its operating point."""

    key: tuple[float, float] = (-1.0, -1.0)
    epoch: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    operating_point: OperatingPoint | None = None


@dataclass
class RunState:
    """What a resumed run takes over from ``last.pt``, and what the loop updates as it goes."""

    start_epoch: int = 0  # first epoch (0-based) this call trains
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Selection = field(default_factory=Selection)
    elapsed_before_s: float = 0.0  # wall-clock seconds of the earlier parts (the budget counts them too)
    steps_before: int = 0  # optimiser steps of the earlier parts
    steps_done: int = 0  # optimiser steps of this call
    epochs_run: int = 0  # epochs finished, earlier parts included
    stopped_by: str = "epochs"


@dataclass(frozen=True)
class CheckpointRecord:
    """The bookkeeping a checkpoint stores beside the model / optimiser / scaler state (see :func:`_save`)."""

    epoch: int  # 0-based index of the epoch just finished
    history: list[dict[str, Any]]
    best: Selection
    elapsed_s: float  # wall-clock seconds of the whole run so far
    steps: int  # optimiser steps of the whole run so far
    stopped_by: str


@dataclass(frozen=True)
class Trainee:
    """The network and what steps it: the bare ``model`` (validated, checkpointed) and ``net``, what the
    training steps run (``model`` wrapped in DDP and/or compiled)."""

    model: nn.Module
    net: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None  # None: no autocast


def train(cfg: Config, plan: Plan, train_cases: list[PreprocessedCase], val_cases: list[PreprocessedCase],
          out_dir: Path, resume: bool = False, progress: bool = True, dist_info: DistInfo = DistInfo(),
          log_metrics: Callable[[dict[str, float], int], None] | None = None,
          stop_after_steps: int | None = None) -> TrainResult:
    """Train and write ``last.pt`` / ``best.pt`` into ``out_dir`` (rank 0). See the module docstring."""
    tc = cfg.train
    device = resolve_device(tc.device)
    torch.manual_seed(cfg.seed + dist_info.rank)
    # determinism requested: cuDNN's deterministic kernels; otherwise let cuDNN autotune (benchmark) its
    # kernels for the fixed patch shape. Both only matter on CUDA; CPU runs are reproducible either way.
    torch.backends.cudnn.deterministic = tc.deterministic
    torch.backends.cudnn.benchmark = not tc.deterministic
    patch = tuple(tc.patch_size or plan.patch_size)
    batch_size = tc.batch_size or plan.batch_size
    check_patch_fits(patch, train_cases)

    # 1. network, loss, optimiser; 2. resume; then DDP / compile around the (resumed) model
    model, loss_fn = _build_network(cfg, plan, device)
    optimizer = build_optimizer(cfg, model)
    autocast_dtype, use_scaler = amp_settings(tc.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    last_path, best_path = last_checkpoint(out_dir), best_checkpoint(out_dir)
    state = _resume(last_path, cfg, plan, model, optimizer, scaler, device) if resume else RunState()
    budget = WallClockBudget(tc.time_budget_min, state.elapsed_before_s)
    run = Trainee(model, _wrap(model, cfg, dist_info, device), loss_fn, optimizer, scaler, device,
                  autocast_dtype)

    batches, workers = _open_batches(cfg, plan, train_cases, patch, batch_size, state.start_epoch, dist_info, device)
    log.info("training: %d loader worker(s), %s", workers,
             f"time budget {tc.time_budget_min} min" if budget.enabled else "no time budget")

    def record(epoch: int, history: list[dict[str, Any]]) -> CheckpointRecord:
        return CheckpointRecord(epoch, history, state.best, budget.elapsed_s(),
                                state.steps_before + state.steps_done, state.stopped_by)

    state.epochs_run = state.start_epoch
    if budget.enabled and _budget_fraction(budget, dist_info, device) >= 1.0:  # resumed with the budget spent
        state.stopped_by = "time_budget"
        log.info("time budget of %s min already spent; nothing to train", tc.time_budget_min)
    try:
        # 3. epochs
        for epoch in range(state.start_epoch, tc.epochs if state.stopped_by == "epochs" else state.start_epoch):
            row, n, budget_ended = _train_epoch(run, cfg, epoch, batches, budget, dist_info, batch_size,
                                                progress, state.steps_done, stop_after_steps)
            state.steps_done += n
            state.epochs_run = epoch + 1
            if budget_ended:
                state.stopped_by = "time_budget"
            # 4. validate on schedule, and always at the end (the last epoch, or the budget's end)
            final = epoch + 1 == tc.epochs or state.stopped_by == "time_budget"
            if val_cases and ((epoch + 1) % tc.val_every == 0 or final):
                if _validate_and_select(run.model, val_cases, plan, cfg, device, patch, dist_info, budget,
                                        epoch, row, state.best) and dist_info.is_main:
                    _save(best_path, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg, plan=plan,
                          record=record(epoch, state.history + [row]))
            state.history.append(row)
            # 5. log, and checkpoint (rank 0)
            if dist_info.is_main:
                _log_epoch(out_dir, state.history, log_metrics)
                if (epoch + 1) % tc.checkpoint_every == 0 or final:
                    _save(last_path, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg, plan=plan,
                          record=record(epoch, state.history))
            barrier(dist_info)  # the others wait for rank 0's checkpoint write only
            if state.stopped_by == "time_budget":
                log.info("time budget of %s min reached after %d steps (epoch %d of %d)", tc.time_budget_min,
                         state.steps_before + state.steps_done, epoch + 1, tc.epochs)
                break
    finally:
        del batches  # ends the loader's worker processes

    # no validation scans: the last model is the best (overwrite: a best.pt left by an earlier run is stale)
    if dist_info.is_main and (not val_cases or not best_path.exists()):
        state.best.epoch = state.epochs_run
        _save(best_path, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg, plan=plan,
              record=record(state.epochs_run - 1, state.history))
    return TrainResult(state.best.epoch, state.best.metrics, state.history, state.best.operating_point,
                       stopped_by=state.stopped_by, steps=state.steps_before + state.steps_done,
                       elapsed_s=budget.elapsed_s())


def _build_network(cfg: Config, plan: Plan, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(model, loss): the network from the plan with its head initialised to the lesion prior, on ``device``."""
    from pipeline.losses import build_loss
    from pipeline.model.factory import build_model
    from pipeline.model.prior_init import init_prior_bias

    tc = cfg.train
    n_classes, in_channels = plan.n_classes, plan.n_channels
    model = build_model(tc.model, plan.network, in_channels, n_classes)
    if tc.model.prior_init:
        init_prior_bias(model, tc.model.prior_probability, tc.loss.mode, n_classes, list(plan.lesion_labels))
    model.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    loss = build_loss(tc.loss, n_classes)
    if tc.loss.focal_reduction == "auto":
        log.info("focal reduction auto -> %s (%d output classes)", loss.focal.reduction, n_classes)
    return model, loss


def _resume(last_path: Path, cfg: Config, plan: Plan, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, device: torch.device) -> RunState:
    """Load model / optimiser / scaler / RNG state from ``last.pt`` (in place) and return the run's state;
    a fresh state (with a warning) when there is no ``last.pt``. A checkpoint from another config or another
    plan (the data re-preprocessed differently) is refused, naming what differs."""
    if not last_path.exists():
        log.warning("--resume: %s does not exist; starting from scratch", last_path)
        return RunState()
    state = load_checkpoint(last_path, device)
    check_resume_compatible(last_path, state["config_flat"], cfg.flat())
    saved_plan = Plan.from_dict(state["plan"], source=f"{last_path}: plan")
    if saved_plan != plan:
        raise CheckpointError(f"{last_path}: checkpoint was trained on another plan (differs in "
                              f"{', '.join(saved_plan.differing_keys(plan))}); cannot resume: re-run "
                              "preprocess as the run started, or train from scratch")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"].cpu())  # map_location moved it to `device`
    start_epoch = int(state["epoch"]) + 1
    best = Selection(tuple(state["best_key"]), int(state["best_epoch"]), dict(state["best_metrics"]),
                     operating_point_or_none(state.get("operating_point"), f"{last_path}: operating_point"))
    log.info("resumed from %s at epoch %d", last_path, start_epoch)
    return RunState(start_epoch, list(state["history"]), best,
                    elapsed_before_s=float(state.get("elapsed_s", 0.0)),
                    steps_before=int(state.get("steps", start_epoch * cfg.train.steps_per_epoch)))


def _wrap(model: nn.Module, cfg: Config, dist_info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun, and compiled with ``train.compile``."""
    net: nn.Module = model
    if dist_info.enabled:
        device_ids = [dist_info.local_rank] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


def _open_batches(cfg: Config, plan: Plan, train_cases: list[PreprocessedCase], patch, batch_size: int,
                  start_epoch: int, dist_info: DistInfo, device: torch.device) -> tuple[Iterator[dict], int]:
    """(batches, loader workers): one batch iterator for the whole run (from ``start_epoch``): its worker
    processes start once (batch g of the stream is step g % spe of epoch g // spe), instead of being rebuilt
    and re-warmed every epoch."""
    tc = cfg.train
    dataset = PatchBatches(train_cases, patch, batch_size, tc.sampling, tc.augment, list(plan.lesion_labels),
                           seed=cfg.seed, rank=dist_info.rank,
                           anisotropic_axis=plan.anisotropic_axis)  # the plan's rule, not re-derived from the config
    dataset.set_stream(tc.steps_per_epoch, start_epoch * tc.steps_per_epoch, tc.epochs * tc.steps_per_epoch)
    workers = resolve_num_workers(tc.num_workers, dist_info.world_size)
    loader = make_loader(dataset, workers, pin_memory=device.type == "cuda")
    # iter() draws the workers' base seed from torch's global RNG; the batches do not use it (they are keyed
    # on (seed, epoch, rank, step)), so keep the RNG to training alone: a resumed run then continues the
    # uninterrupted run's RNG stream exactly
    rng_state = torch.get_rng_state()
    batches = iter(loader) if start_epoch < tc.epochs else iter(())
    torch.set_rng_state(rng_state)
    return batches, workers


def _budget_fraction(budget: WallClockBudget, dist_info: DistInfo, device: torch.device) -> float:
    """Fraction of the budget used; under DDP the largest over ranks, so all ranks stop together."""
    frac = budget.fraction()
    if budget.enabled and dist_info.enabled:
        t = torch.tensor([frac], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        frac = float(t.item())
    return frac


def _train_epoch(run: Trainee, cfg: Config, epoch: int, batches, budget: WallClockBudget, dist_info: DistInfo,
                 batch_size: int, progress: bool, steps_before: int,
                 stop_after_steps: int | None) -> tuple[dict[str, Any], int, bool]:
    """One epoch of ``train.steps_per_epoch`` steps (fewer when the budget ends it): ``(row, steps, ended)``.

    ``row``: the epoch's mean losses (over every rank's batches under DDP), last LR, steps, throughput and
    data-wait share; ``ended``: the time budget is spent. ``steps_before``: steps of this call so far (the
    ``stop_after_steps`` test hook counts from the call's start and raises :class:`KeyboardInterrupt`).
    """
    from tqdm import tqdm

    tc, device = cfg.train, run.device
    spe = tc.steps_per_epoch
    total_steps, warmup = tc.epochs * spe, tc.optim.warmup_epochs * spe
    run.net.train()
    sums = {"loss": 0.0, "focal": 0.0, "dice_loss": 0.0}
    wait = compute = lr = 0.0
    n = 0
    ended = False
    t_epoch = t_ready = time.perf_counter()
    bar = tqdm(total=spe, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step",
               disable=not (progress and dist_info.is_main), leave=False)
    for step in range(spe):
        # every epoch runs at least one step; then the budget can end it mid-epoch
        frac = _budget_fraction(budget, dist_info, device) if budget.enabled else 0.0
        if step > 0 and frac >= 1.0:
            ended = True
            break
        batch = next(batches)
        t_got = time.perf_counter()
        wait += t_got - t_ready
        lr = learning_rate(epoch * spe + step, total_steps, tc.optim.lr, tc.optim.schedule, warmup,
                           time_fraction=frac)
        total, focal, dice = _step(run, cfg, batch, lr)
        sums["loss"] += float(total.detach())
        sums["focal"] += float(focal.detach())
        sums["dice_loss"] += float(dice.detach())
        t_ready = time.perf_counter()
        compute += t_ready - t_got
        n += 1
        bar.update()
        bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
        if stop_after_steps is not None and steps_before + n >= stop_after_steps:
            raise KeyboardInterrupt(f"stopped after {steps_before + n} steps (test hook)")
    bar.close()
    if budget.enabled and _budget_fraction(budget, dist_info, device) >= 1.0:
        ended = True
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
    return row, n, ended


def _step(run: Trainee, cfg: Config, batch: dict[str, torch.Tensor], lr: float):
    """One optimiser step at learning rate ``lr``: AMP forward, loss, (scaled) backward, clipping, step.
    Returns ``(total, focal, dice)`` loss tensors."""
    tc, device, optimizer = cfg.train, run.device, run.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    image = batch["image"].to(device, non_blocking=True)
    target = batch["label"].to(device, non_blocking=True)
    if tc.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, run.amp_dtype):
        output = run.net(image)
    total, focal, dice = supervised_loss(run.loss_fn, output, target)
    run.scaler.scale(total).backward()
    if tc.optim.grad_clip:
        run.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), tc.optim.grad_clip)
    run.scaler.step(optimizer)
    run.scaler.update()
    return total, focal, dice


def _validate_and_select(model: nn.Module, val_cases: list[PreprocessedCase], plan: Plan, cfg: Config,
                         device: torch.device, patch, dist_info: DistInfo, budget: WallClockBudget, epoch: int,
                         row: dict[str, Any], best: Selection) -> bool:
    """Validate (under DDP each rank its share of the scans, results gathered: every rank gets the same
    metrics), add the ``val_`` metrics to ``row`` and update ``best`` when (CPM, Dice) improved; returns
    whether it did (then the caller writes ``best.pt``)."""
    from pipeline.training import validate as validation  # looked up per call: tests replace `validate`

    t_val = time.perf_counter()
    if dist_info.enabled:
        val = validation.validate_distributed(model, val_cases, plan, cfg, device, patch, dist_info)
    else:
        val = validation.validate(model, val_cases, plan, cfg, device, patch)
    budget.reserve_s = time.perf_counter() - t_val  # the final validation will take about as long
    row.update({f"val_{k}": v for k, v in val.metrics.items()})
    key = (val.metrics["cpm"], val.metrics["dice_lesion"])
    if not key > best.key:  # (not <=: a NaN CPM never counts as an improvement)
        return False
    best.key, best.epoch, best.metrics, best.operating_point = key, epoch + 1, dict(val.metrics), val.operating_point
    return True


def _log_epoch(out_dir: Path, history: list[dict[str, Any]],
               log_metrics: Callable[[dict[str, float], int], None] | None) -> None:
    """The last row to the log and MLflow, the whole history to ``train_log.csv`` (live progress for
    ``dvc plots`` / tail)."""
    row = history[-1]
    log.info("epoch %d: %s", row["epoch"], ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
    if log_metrics:
        log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, row["epoch"])
    write_history_csv(out_dir / "train_log.csv", history)


def _save(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          cfg: Config, plan: Plan, record: CheckpointRecord) -> None:
    """Write a checkpoint (atomically): model / optimiser / scaler / RNG state, the config and plan, and
    ``record``'s bookkeeping (what :func:`_resume` and the inference side read back)."""
    best = record.best
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "epoch": record.epoch, "torch_rng": torch.get_rng_state(), "history": record.history,
        "config": cfg.to_dict(), "config_flat": cfg.flat(), "plan": plan.to_dict(),
        "best_key": list(best.key), "best_epoch": best.epoch, "best_metrics": best.metrics,
        "operating_point": best.operating_point.to_dict() if best.operating_point else None,
        # wall-clock budget bookkeeping
        "elapsed_s": record.elapsed_s, "steps": record.steps, "stopped_by": record.stopped_by,
    })
