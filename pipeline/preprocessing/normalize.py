"""Intensity normalisation per channel: CT (data-set-wide clip + z-score), per-scan z-score, or none.

* ``ct``: clip to the data set's foreground percentiles (default 0.5 / 99.5, from the fingerprint), then
  ``(x - mean) / std`` with the data set's foreground mean and std (HU in, unitless out). As nnU-Net.
* ``zscore``: per scan, ``(x - mean) / std`` over the nonzero mask (any channel != 0); voxels outside the
  mask are set to 0. With no zero background the mask is the whole scan (plain z-score).
* ``none``: cast to float32 only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SCHEMES = ("ct", "zscore", "none")
_MIN_STD = 1e-8


def per_channel(channel_names: Sequence[str], configured: Sequence[str], key: str, noun: str) -> list[str]:
    """``configured`` (a ``preprocess.intensity.<key>`` list) as one entry per channel: one entry is used for
    every channel, otherwise there must be one per channel.

    Raises:
        ValueError: the number of entries fits neither one nor every channel (names the key and channels).
    """
    n = len(channel_names)
    if len(configured) not in (1, n):
        raise ValueError(
            f"preprocess.intensity.{key} has {len(configured)} entries but the data set has {n} channels "
            f"{list(channel_names)}: give one {noun} for all channels or one per channel"
        )
    return list(configured) * n if len(configured) == 1 else list(configured)


def resolve_schemes(channel_names: Sequence[str], configured: Sequence[str]) -> list[str]:
    """One scheme per channel: ``configured`` (one entry = all channels); ``auto`` -> CT for channels named
    ``CT``, none for ``noNorm`` / ``none``, z-score otherwise (nnU-Net's rule).

    Raises:
        ValueError: the number of configured schemes fits neither one nor every channel.
    """
    chosen = per_channel(channel_names, configured, "scheme", "scheme")
    out = []
    for name, configured_scheme in zip(channel_names, chosen, strict=True):
        scheme = configured_scheme
        if scheme == "auto":
            lowered = name.strip().lower()
            scheme = "ct" if lowered == "ct" else "none" if lowered in ("nonorm", "none") else "zscore"
        if scheme not in SCHEMES:
            raise ValueError(
                f"unknown intensity scheme {scheme!r} for channel {name!r} (use one of {SCHEMES})"
            )
        out.append(scheme)
    return out


def resolve_bias_field(channel_names: Sequence[str], schemes: Sequence[str], intensity: Any) -> list[dict | None]:
    """Per channel the plan's bias-field entry: ``{"method": "n4", "grid_mm", "iterations"}`` where
    ``intensity.bias_field`` (one entry = all channels) says ``n4``, else None.

    Raises:
        ValueError: the number of entries fits neither one nor every channel, or ``n4`` is asked for a CT
            channel (Hounsfield units are calibrated: a CT scan has no multiplicative field to remove).
    """
    chosen = per_channel(channel_names, intensity.bias_field, "bias_field", "entry")
    out: list[dict | None] = []
    for name, scheme, method in zip(channel_names, schemes, chosen, strict=True):
        if method == "none":
            out.append(None)
            continue
        if scheme == "ct":
            raise ValueError(
                f"preprocess.intensity.bias_field: n4 on the CT channel {name!r}; Hounsfield units are "
                "calibrated and have no bias field (use none for it, e.g. [none, n4] per channel)"
            )
        out.append({"method": "n4", "grid_mm": float(intensity.n4_grid_mm),
                    "iterations": [int(i) for i in intensity.n4_iterations]})
    return out


def intensity_parameters(data: np.ndarray, intensity: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parameters to apply per channel of a raw ``(C, X, Y, Z)`` scan (any dtype, any strides).

    CT entries are the plan's (clip / mean / std of the data set); z-score entries get this scan's mean and
    std over its nonzero mask (``masked: False`` when the scan has no zero background).

    Returns:
        Per channel ``{"scheme", "clip", "mean", "std"}`` (+ ``"masked"`` for z-score), JSON-able.
    """
    if len(intensity) != data.shape[0]:
        raise ValueError(
            f"image has {data.shape[0]} channels, the plan has {len(intensity)} intensity entries"
        )
    mask = None
    if any(p["scheme"] == "zscore" for p in intensity):
        mask = np.any(data != 0, axis=0)
        if mask.all() or not mask.any():
            mask = None  # no background to leave out: plain z-score over the whole scan
    applied = []
    for c, params in enumerate(intensity):
        scheme = params["scheme"]
        if scheme == "ct":
            lo, hi = params["clip"]
            applied.append(
                {
                    "scheme": "ct",
                    "clip": [float(lo), float(hi)],
                    "mean": float(params["mean"]),
                    "std": max(float(params["std"]), _MIN_STD),
                }
            )
        elif scheme == "zscore":
            values = data[c] if mask is None else data[c][mask]
            mean = float(values.mean(dtype=np.float64))
            std = max(float(values.std(dtype=np.float64)), _MIN_STD)
            applied.append(
                {"scheme": "zscore", "clip": None, "mean": mean, "std": std, "masked": mask is not None}
            )
        elif scheme == "none":
            applied.append({"scheme": "none", "clip": None, "mean": None, "std": None})
        else:
            raise ValueError(f"unknown intensity scheme {scheme!r} for channel {c}")
    return applied


def apply_intensity_(data: np.ndarray, applied: Sequence[dict[str, Any]]) -> None:
    """Apply :func:`intensity_parameters` output to a float32 ``(C, ...)`` array (or any block of one) **in
    place**. Pointwise, so a scan can be normalised block by block with the same result."""
    if data.dtype != np.float32:
        raise TypeError(f"apply_intensity_: expected float32, got {data.dtype}")
    outside = None
    if any(p.get("masked") for p in applied):  # the mask comes from the raw values, before any change
        outside = ~np.any(data != 0, axis=0)
    for c, params in enumerate(applied):
        x = data[c]
        if params["scheme"] == "ct":
            np.clip(x, params["clip"][0], params["clip"][1], out=x)
        if params["scheme"] in ("ct", "zscore"):
            x -= np.float32(params["mean"])
            x /= np.float32(params["std"])
        if params.get("masked"):
            x[outside] = 0.0


def normalize_(data: np.ndarray, intensity: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalise a float32 ``(C, X, Y, Z)`` array **in place**, channel by channel.

    Args:
        data: float32 image, channel-first; modified in place.
        intensity: per channel ``{"scheme", "clip": [lo, hi] | None, "mean", "std"}`` (the plan's entries;
            ``mean``/``std`` of ``zscore`` channels are computed here, per scan).

    Returns:
        The parameters actually applied per channel (JSON-able), for the per-case record.
    """
    applied = intensity_parameters(data, intensity)
    apply_intensity_(data, applied)
    return applied
