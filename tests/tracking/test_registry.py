"""The champion alias moves only to a version whose test CPM beats the holder's (smoke runs never take it)."""

from __future__ import annotations

import math

import pytest

from pipeline.tracking.registry import promote_if_better, should_promote


@pytest.mark.parametrize(("new", "holder", "min_cpm", "expected"), [
    (0.8, 0.7, 0.0, True),     # better
    (0.7, 0.7, 0.0, False),    # a tie keeps the holder
    (0.6, 0.7, 0.0, False),    # worse
    (0.3, None, 0.0, True),    # no holder yet
    (0.0, None, 0.0, False),   # a smoke run that finds nothing never takes an empty alias
    (0.3, None, 0.5, False),   # below the configured floor
    (math.nan, None, 0.0, False),
    (None, 0.2, 0.0, False),
    (0.1, math.nan, 0.0, True),  # a holder without a readable CPM is beaten by any valid one
])
def test_should_promote(new, holder, min_cpm, expected):
    assert should_promote(new, holder, min_cpm) is expected


def test_alias_follows_the_best_test_cpm(store_uri):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
    client.create_registered_model("m")
    for _ in range(4):
        client.create_model_version("m", source="file:///nowhere/model")

    def holder():
        try:
            return int(client.get_model_version_by_alias("m", "champion").version)
        except mlflow.exceptions.MlflowException:
            return None

    assert not promote_if_better(client, "m", 1, 0.0).promoted  # 1-epoch smoke run: CPM 0
    assert holder() is None
    assert promote_if_better(client, "m", 2, 0.61).promoted
    assert holder() == 2
    result = promote_if_better(client, "m", 3, 0.55)  # a later but worse run
    assert not result.promoted and result.previous_version == 2 and result.previous_cpm == pytest.approx(0.61)
    assert holder() == 2
    assert promote_if_better(client, "m", 4, 0.7).promoted
    assert holder() == 4
    assert client.get_model_version("m", "3").tags["test.cpm"] == "0.55"
    assert client.get_model_version("m", "1").tags["test.cpm"] == "0.0"
