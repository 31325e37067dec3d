"""Lesion-aware patch sampling for rare lesions.

nnU-Net and MONAI oversample foreground by picking a random *voxel* of the class, so a 20 mm lesion
(thousands of voxels) is centred hundreds of times more often than a 4 mm one. We pick a *lesion*
(a 26-connected component of the lesion classes, over the whole training set) first, uniformly or
weighted by a size rule, then a voxel inside it; small lesions are seen as often as big ones.

With several lesion classes (``class_balance``), a lesion class is chosen first, uniformly among the
classes present in the training set, then a lesion of that class: a rare class with few lesions is
sampled as often as a common one.

A batch of ``B`` patches holds ``floor(f * B)`` lesion-centred patches plus one more with probability
``frac(f * B)``, so the expected share is exactly ``f`` (nnU-Net rounds per batch, which turns 1/3 into 1/2
at batch size 2). The other patches are centred on a uniformly random voxel of a uniformly random case.
"""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np


@dataclass(frozen=True)
class LesionIndex:
    """Voxels of every lesion of one scan, grouped by component (flat C-order indices)."""

    shape: tuple[int, int, int]
    voxels: np.ndarray  # (V,) int64 flat indices, sorted by component
    starts: np.ndarray  # (n + 1,) offsets of each component in ``voxels``
    classes: np.ndarray | None = None  # (n,) label value of each component

    @property
    def sizes(self) -> np.ndarray:
        """Voxels per lesion."""
        return np.diff(self.starts)

    @property
    def n_lesions(self) -> int:
        return len(self.starts) - 1


def index_lesions(label: np.ndarray, lesion_labels) -> LesionIndex:
    """26-connected components of each lesion class of ``label``, in one pass (no per-lesion volume ops).

    Touching voxels of two different lesion classes form two components (cc3d labels each value apart).
    """
    lesion_only = np.where(np.isin(label, list(lesion_labels)), label, 0)
    components = cc3d.connected_components(np.ascontiguousarray(lesion_only), connectivity=26).ravel()
    voxels = np.flatnonzero(components)
    order = np.argsort(components[voxels], kind="stable")
    voxels = voxels[order].astype(np.int64)
    sizes = np.bincount(components[voxels])[1:] if voxels.size else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    classes = lesion_only.ravel()[voxels[starts[:-1]]].astype(np.int64) if sizes.size else np.zeros(0, np.int64)
    return LesionIndex(tuple(label.shape), voxels, starts, classes)


def lesion_weights(sizes: np.ndarray, rule: str) -> np.ndarray:
    """Probability of choosing each lesion: ``uniform`` 1/n, ``volume`` ~ size (like voxel sampling),
    ``sqrt_volume`` ~ sqrt(size) (in between)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if rule == "uniform":
        w = np.ones_like(sizes)
    elif rule == "volume":
        w = sizes
    elif rule == "sqrt_volume":
        w = np.sqrt(sizes)
    else:
        raise ValueError(f"unknown lesion weighting {rule!r}")
    return w / w.sum()


class PatchSampler:
    """Chooses patch centres over a set of scans. Pure given its ``numpy.random.Generator``."""

    def __init__(self, shapes: list[tuple[int, int, int]], indices: list[LesionIndex], lesion_fraction: float,
                 weighting: str = "uniform", class_balance: bool = True, count: str = "expected"):
        if count not in ("expected", "fixed"):
            raise ValueError(f"unknown lesion patch count rule {count!r} (use 'expected' or 'fixed')")
        self.shapes = shapes
        self.indices = indices
        self.lesion_fraction = lesion_fraction
        self.count = count
        # one global table of lesions: (case, component) with its choice probability
        self.table = np.array([(c, k) for c, idx in enumerate(indices) for k in range(idx.n_lesions)], dtype=np.int64)
        sizes = np.concatenate([idx.sizes for idx in indices]) if self.table.size else np.zeros(0)
        self.probs = lesion_weights(sizes, weighting) if self.table.size else np.zeros(0)
        if class_balance and self.table.size:
            classes = np.concatenate([idx.classes if idx.classes is not None else np.zeros(idx.n_lesions, np.int64)
                                      for idx in indices])
            present = np.unique(classes)
            probs = np.zeros_like(self.probs)
            for c in present:  # each class present gets 1/k, shared by its lesions by the weighting rule
                members = classes == c
                probs[members] = lesion_weights(sizes[members], weighting) / len(present)
            self.probs = probs

    def n_lesion_patches(self, rng: np.random.Generator, batch_size: int) -> int:
        """Lesion-centred patches in a batch of ``batch_size``.

        * ``"expected"``: ``floor(f B)``, plus one with probability ``f B - floor(f B)`` (mean ``f B``);
        * ``"fixed"``: nnU-Net's ``B - round(B (1 - f))`` in every batch (its ``_oversample_last_XX_percent``;
          batch 2 at f = 1/3 -> 1, batch 8 -> 3), so that no batch lacks foreground; where that is 0 but f > 0
          (batch 1) it falls back to ``"expected"``.
        """
        if self.count == "fixed":
            n = batch_size - round(batch_size * (1.0 - self.lesion_fraction))
            if n > 0 or self.lesion_fraction == 0:
                return n
        expected = self.lesion_fraction * batch_size
        n = int(np.floor(expected))
        return n + int(rng.random() < expected - n)

    def lesion_centre(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int]]:
        case, comp = self.table[rng.choice(len(self.table), p=self.probs)]
        idx = self.indices[case]
        flat = idx.voxels[rng.integers(idx.starts[comp], idx.starts[comp + 1])]
        return int(case), tuple(int(v) for v in np.unravel_index(flat, idx.shape))  # type: ignore[return-value]

    def random_centre(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int]]:
        case = int(rng.integers(len(self.shapes)))
        return case, tuple(int(rng.integers(n)) for n in self.shapes[case])  # type: ignore[return-value]

    def batch(self, rng: np.random.Generator, batch_size: int) -> list[tuple[int, tuple[int, int, int], bool]]:
        """``batch_size`` (case, centre voxel, lesion-centred?) triples; lesion patches come first."""
        n_lesion = self.n_lesion_patches(rng, batch_size) if len(self.table) else 0
        out = [(*self.lesion_centre(rng), True) for _ in range(n_lesion)]
        out += [(*self.random_centre(rng), False) for _ in range(batch_size - n_lesion)]
        return out  # type: ignore[return-value]


def crop_box(shape, centre, patch_size) -> tuple[list[int], list[int]]:
    """Start (may be negative where padding is needed) and stop of a patch that contains ``centre``.

    The patch is centred on ``centre`` and then shifted to lie inside the volume where the volume is
    larger than the patch, so a sampled lesion voxel is always inside its patch.
    """
    start, stop = [], []
    for n, c, p in zip(shape, centre, patch_size, strict=True):
        s = c - p // 2
        s = min(max(s, min(0, n - p)), max(0, n - p)) if n >= p else (n - p) // 2
        start.append(int(s))
        stop.append(int(s + p))
    return start, stop


def crop_patch(array: np.ndarray, start: list[int], stop: list[int], pad_value: float = 0.0) -> np.ndarray:
    """Crop ``array[..., x, y, z]`` to the box, padding with ``pad_value`` outside the volume."""
    spatial = array.shape[-3:]
    src = tuple(slice(max(s, 0), min(e, n)) for s, e, n in zip(start, stop, spatial, strict=True))
    out = np.full(array.shape[:-3] + tuple(e - s for s, e in zip(start, stop, strict=True)), pad_value, array.dtype)
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    out[(...,) + dst] = array[(...,) + src]
    return out
