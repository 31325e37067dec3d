"""Sliding-window inference with Gaussian blending, mirror test-time augmentation and AMP.

Windows run on ``device``; the blended output is accumulated on the CPU (``out_device``) so a
512 x 512 x 600 scan needs host memory for the class maps, not GPU memory.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from pipeline.config import InferenceConfig
from pipeline.losses.probability import probabilities
from pipeline.model.device import amp_dtype, autocast
from pipeline.model.factory import main_output


def lesion_probability(probs: torch.Tensor, lesion_labels, mode: str) -> torch.Tensor:
    """(K, ...) class probabilities -> (...) probability that a voxel is any lesion class.

    Softmax: the sum of the lesion classes' probabilities (they are exclusive). Sigmoid: their maximum.
    """
    lesion = probs[list(lesion_labels)]
    return lesion.sum(0).clamp_(0, 1) if mode == "softmax" else lesion.max(0).values


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: torch.Tensor, patch_size, cfg: InferenceConfig, mode: str,
                          device: torch.device, out_device: torch.device | str = "cpu",
                          progress: bool = False) -> torch.Tensor:
    """Class probabilities for one image.

    Args:
        model: network returning (N, K, *patch) logits (deep supervision heads are dropped).
        image: (C, X, Y, Z) preprocessed image (any device).
        patch_size: window size in voxels (X, Y, Z); smaller images are padded by MONAI.
        cfg: overlap, sw_batch_size, blending mode, mirror TTA and AMP.
        mode: ``"softmax"`` or ``"sigmoid"`` (the loss's probability model).

    Returns:
        (K, X, Y, Z) float32 probabilities on ``out_device``; with ``tta_mirror`` the mean over all 8
        flips of the three axes (each prediction flipped back).
    """
    from monai.inferers import sliding_window_inference

    was_training = model.training
    model.eval()

    dtype = amp_dtype("auto" if cfg.amp else "off", device)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            return probabilities(main_output(model(x)).float(), mode)  # float32 even from AMP logits

    flips = [()] + ([c for r in (1, 2, 3) for c in itertools.combinations((2, 3, 4), r)] if cfg.tta_mirror else [])
    batch = image[None].to(device)
    total = None
    for axes in flips:
        x = torch.flip(batch, axes) if axes else batch
        out = sliding_window_inference(x, roi_size=tuple(patch_size), sw_batch_size=cfg.sw_batch_size,
                                       predictor=predictor, overlap=cfg.overlap, mode=cfg.blend,
                                       sw_device=device, device=out_device, progress=progress)
        out = torch.flip(out, axes) if axes else out
        total = out if total is None else total.add_(out)
    model.train(was_training)
    return (total / len(flips))[0].float()
