"""Model registry rules: version tags and the ``champion`` alias, moved only by a better test CPM.

Every training run registers a version of ``tracking.registered_model`` (MLflow's "latest" is simply the
newest, a 1-epoch smoke run included). Users and serving should use the alias instead:
``models:/rare-lesion-unet@champion``. The evaluate stage tags the version with its test CPM and moves the
alias to it only when :func:`should_promote` says so.

Version tags (strings): ``test.cpm``, ``git.commit``, ``git.dirty``, ``data.hash``, ``pipeline_key``,
``train_run_id``, ``evaluate_run_id``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CPM_TAG = "test.cpm"


def should_promote(new_cpm: float | None, holder_cpm: float | None, min_cpm: float = 0.0) -> bool:
    """Whether a version with test CPM ``new_cpm`` takes the alias from a holder with ``holder_cpm``.

    Promote iff ``new_cpm`` is a finite number, ``new_cpm > min_cpm`` and (there is no holder, or the holder
    has no readable CPM, or ``new_cpm > holder_cpm``). Strict: a tie keeps the current holder, and a run
    that finds no lesion (CPM 0, a typical smoke run) never takes an empty alias with the default
    ``min_cpm = 0``.

    >>> should_promote(0.8, 0.7), should_promote(0.7, 0.7), should_promote(0.0, None), should_promote(0.3, None)
    (True, False, False, True)
    """
    if new_cpm is None or not math.isfinite(new_cpm) or new_cpm <= min_cpm:
        return False
    if holder_cpm is None or not math.isfinite(holder_cpm):
        return True
    return new_cpm > holder_cpm


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote_if_better` decided: ``promoted``, the previous holder and its CPM."""

    promoted: bool
    alias: str
    version: int
    cpm: float | None
    previous_version: int | None
    previous_cpm: float | None

    def describe(self) -> str:
        prev = (f"version {self.previous_version} (test CPM {self.previous_cpm})" if self.previous_version
                else "no holder")
        verb = "moved to" if self.promoted else "kept; not moved to"
        return f"alias {self.alias!r} {verb} version {self.version} (test CPM {self.cpm}); before: {prev}"


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def tag_version(client: Any, name: str, version: int | str, tags: dict[str, Any]) -> None:
    """Set string tags on one registered model version (None values are skipped)."""
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, str(version), key, str(value))


def promote_if_better(client: Any, name: str, version: int | str, cpm: float | None, alias: str = "champion",
                      min_cpm: float = 0.0) -> Promotion:
    """Tag ``version`` with its test CPM and point ``alias`` at it if :func:`should_promote` says so.

    The holder's CPM is read from its ``test.cpm`` tag (a holder without one is beaten by any valid CPM).
    """
    from mlflow.exceptions import MlflowException

    tag_version(client, name, version, {CPM_TAG: cpm if cpm is not None else "nan"})
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    holder_version = int(holder.version) if holder is not None else None
    holder_cpm = _float((holder.tags or {}).get(CPM_TAG)) if holder is not None else None
    if holder_version == int(version):
        # the same version evaluated again: the alias stays with it only if it still clears the bar
        holder_cpm = None
    promoted = should_promote(cpm, holder_cpm, min_cpm)
    if promoted and holder_version != int(version):
        client.set_registered_model_alias(name, alias, str(version))
    result = Promotion(promoted, alias, int(version), cpm, holder_version, holder_cpm)
    log.info("MLflow registry %s: %s", name, result.describe())
    return result
