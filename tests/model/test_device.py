"""pipeline/model/device.py: which autocast dtype an ``amp`` setting means on each device."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import device as device_mod
from pipeline.model.device import amp_dtype, autocast, cpu_has_native_bf16
from pipeline.training.loop import amp_settings

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_autocast_is_bf16_only_where_the_cpu_has_it_or_when_asked(monkeypatch, native):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    assert amp_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert amp_dtype("bf16", CPU) == torch.bfloat16  # asked for: also where emulated
    assert amp_dtype("fp16", CPU) is None  # no fast fp16 path on a CPU: float32
    assert amp_dtype("off", CPU) is None
    # training: bf16 needs no gradient scaler
    assert amp_settings("auto", CPU) == ((torch.bfloat16, False) if native else (None, False))


def test_native_bf16_probe_answers_a_bool_and_matches_torch():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() is bool(expected)


def test_autocast_context_runs_convolutions_at_the_dtype():
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5, 5)
    with autocast(CPU, torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert conv(x).dtype == torch.float32
