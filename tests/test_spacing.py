"""pipeline/spacing.py: the one anisotropy rule."""

from __future__ import annotations

import pytest

from pipeline.spacing import anisotropic_axis, is_anisotropic


@pytest.mark.parametrize("spacing, expected", [
    ((0.8, 0.8, 2.5), 2),       # 3.125 > 3: the thick axis
    ((5.0, 1.0, 1.0), 0),       # any axis order
    ((0.8, 0.8, 2.4), None),    # exactly 3: not strictly greater
    ((1.0, 1.0, 1.0), None),    # isotropic
    ((2.5, 2.5, 0.8), None),    # two coarse axes: no single axis to treat apart
    ((0.5, 1.0, 2.0), 2),       # max / min decides, not the middle axis
])
def test_anisotropic_axis(spacing, expected):
    assert anisotropic_axis(spacing, 3.0) == expected


def test_is_anisotropic_is_the_ratio_test():
    assert is_anisotropic((1.0, 1.0, 3.01), 3.0) and not is_anisotropic((1.0, 1.0, 3.0), 3.0)
    assert is_anisotropic((2.5, 2.5, 0.8), 3.0)  # anisotropic, though no unique axis
