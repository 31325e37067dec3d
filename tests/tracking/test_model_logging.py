"""Logging a bare PyTorch network (the whole-scan pyfunc is tested in test_pyfunc_model.py)."""

from __future__ import annotations

import numpy as np


class _DataDependent:
    """A model torch.export cannot trace (data-dependent branch): logging falls back to pickle."""

    @staticmethod
    def build():
        import torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

            def forward(self, x):
                y = self.conv(x)
                if y.sum() > 1e9:  # data-dependent control flow
                    return y * 0
                return y

        return Net()


def test_torch_model_falls_back_to_pickle_and_registers(store_uri, new_tracker, client):
    import mlflow
    import torch

    torch.manual_seed(0)
    model = _DataDependent.build()
    tracker = new_tracker()
    with tracker.start("train") as run:
        info = run.log_torch_model(model, np.zeros((1, 1, 8, 8, 8), np.float32), "tiny-fallback")
        run_id = run.run_id
    assert info["serialization_format"] == "pickle"
    assert info["registered_model_version"] == 1
    version = client.get_model_version("tiny-fallback", "1")
    assert version.run_id == run_id
    mlflow.set_registry_uri(store_uri)
    loaded = mlflow.pytorch.load_model("models:/tiny-fallback/1")
    x = torch.rand(1, 1, 8, 12, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert client.get_run(run_id).data.tags["model.serialization_format"] == "pickle"
