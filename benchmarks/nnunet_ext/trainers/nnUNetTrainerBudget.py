"""nnU-Net v2 trainer that stops at a wall-clock budget (for ``benchmarks/bench_real_data.py``).

Runs only inside the reference venv (``benchmarks/setup_reference_venv.sh``). nnU-Net finds trainers by class
name: this file is linked into the installed ``nnunetv2/training/nnUNetTrainer/`` folder (by the setup script
and by ``bench_real_data.py``), where it is found before nnU-Net imports its ``primus`` subpackage (timm ->
torchvision, which fails to import with the CPU torch here). ``nnUNet_extTrainer`` also points at this folder;
nnU-Net imports every module of it: keep only trainers here.

What differs from ``nnUNetTrainer`` (everything else, network, loss, augmentation, sampling, SGD with
Nesterov momentum 0.99 and lr 1e-2, is nnU-Net's own):

1. **Budget.** Training stops after the first iteration that ends at or after ``NNUNET_BENCH_BUDGET_S``
   seconds, counted from the start of ``run_training`` (data loaders and network set-up included, as our
   ``train.time_budget_min`` counts the whole of ``train()``), or after ``NNUNET_BENCH_MAX_ITERS`` iterations if that
   is set (used to time the default plan). ``checkpoint_final.pth`` is written as usual.
2. **Schedule compressed to the budget.** nnU-Net's poly schedule ``lr = 1e-2 (1 - e / E)^0.9`` runs over
   ``E = num_epochs`` epochs; here ``e / E`` is replaced by the elapsed fraction of the budget (or of the
   iteration cap), set at the start of every epoch, so the learning rate decays to ~0 by the budget instead
   of staying near 1e-2 when only a few of the 1,000 epochs fit.
3. **Short epochs and (almost) no validation.** ``NNUNET_BENCH_ITERS_PER_EPOCH`` (default 25, nnU-Net: 250)
   iterations per epoch so the schedule and the budget check are fine-grained; one validation iteration per
   epoch (nnU-Net: 50; the benchmark's "validation" case is a training case, used only for nnU-Net's
   pseudo-Dice log); the final full validation (sliding window over every validation case) is skipped:
   the benchmark predicts the held-out test scans with ``nnUNetv2_predict`` instead.

``budget_log.json`` in the fold's output folder records iterations, per-iteration seconds and the reason
training stopped.
"""

from __future__ import annotations

import json
import os
import time
from os.path import join

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net finds trainers by this naming scheme
    """nnUNetTrainer with a wall-clock (or iteration) budget and a poly schedule compressed to it."""

    # nnUNetTrainer records its constructor arguments by name (for checkpoints): keep its exact signature
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = _env_float("NNUNET_BENCH_BUDGET_S", 900.0)
        self.max_iters = int(_env_float("NNUNET_BENCH_MAX_ITERS", 0))  # 0: no cap
        self.num_iterations_per_epoch = int(_env_float("NNUNET_BENCH_ITERS_PER_EPOCH", 25))
        self.num_val_iterations_per_epoch = 1
        self._t_start: float | None = None
        self._iters_done = 0
        self._iter_times: list[float] = []

    # 1. elapsed fraction of the budget (or of the iteration cap) in [0, 1]
    def _budget_fraction(self) -> float:
        if self.max_iters > 0:
            return min(1.0, self._iters_done / self.max_iters)
        if self._t_start is None:
            return 0.0
        return min(1.0, (time.perf_counter() - self._t_start) / self.budget_s)

    def _budget_spent(self) -> bool:
        return self._budget_fraction() >= 1.0

    def on_train_epoch_start(self):
        # 2. poly schedule over the budget: step = fraction x num_epochs (PolyLRScheduler takes the step)
        self.network.train()
        step = min(int(self._budget_fraction() * self.num_epochs), self.num_epochs - 1)
        self.lr_scheduler.step(step)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch} (budget fraction {self._budget_fraction():.3f})")
        self.print_to_log_file(f"Current learning rate: {np.round(self.optimizer.param_groups[0]['lr'], decimals=5)}")
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    def run_training(self):
        self._t_start = time.perf_counter()
        self.on_train_start()
        stopped_by = "num_epochs"
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for _ in range(self.num_iterations_per_epoch):
                t0 = time.perf_counter()
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                self._iter_times.append(time.perf_counter() - t0)
                self._iters_done += 1
                if self._budget_spent():
                    break
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            if self._budget_spent():
                stopped_by = "max_iters" if self.max_iters > 0 else "budget"
                break
        elapsed = time.perf_counter() - self._t_start
        self.on_train_end()
        if self.local_rank == 0:
            log = {
                "budget_s": self.budget_s, "max_iters": self.max_iters, "stopped_by": stopped_by,
                "iterations": self._iters_done, "epochs": self.current_epoch, "train_loop_s": elapsed,
                "iteration_s": self._iter_times, "batch_size": self.configuration_manager.batch_size,
                "patch_size": list(self.configuration_manager.patch_size),
                "parameters": sum(p.numel() for p in self.network.parameters()),
            }
            with open(join(self.output_folder, "budget_log.json"), "w") as f:
                json.dump(log, f, indent=1)

    def perform_actual_validation(self, save_probabilities: bool = False):
        # 3. the benchmark predicts its own held-out scans; nnU-Net's validation set here is a training case
        self.print_to_log_file("final validation skipped (nnUNetTrainerBudget)")
