"""When a voxel grid is strongly anisotropic, and along which axis: the one rule the plan, the resampling,
the augmentation and the model's plan use (nnU-Net's "separate z" test).

The target spacing itself follows nnU-Net's own, different test (the coarsest median spacing against the
coarser of the two others): :func:`pipeline.preprocessing.plan.target_spacing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def is_anisotropic(spacing_mm: Sequence[float], ratio: float) -> bool:
    """``max(spacing) / min(spacing) > ratio`` (spacings in mm, any axis order)."""
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    return bool(spacing.max() / spacing.min() > ratio)


def anisotropic_axis(spacing_mm: Sequence[float], ratio: float) -> int | None:
    """The thick-slice axis of a strongly anisotropic grid (:func:`is_anisotropic`), or None when the grid
    is not, or when two axes share the coarsest spacing (no single axis to treat apart).

    Example:
        >>> anisotropic_axis((0.8, 0.8, 2.5), 3.0), anisotropic_axis((0.8, 0.8, 2.0), 3.0)
        (2, None)
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if not is_anisotropic(spacing, ratio):
        return None
    axes = np.flatnonzero(spacing == spacing.max())
    return int(axes[0]) if len(axes) == 1 else None
