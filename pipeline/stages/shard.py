"""Shards of a stage: process ``K`` of ``N`` deterministic parts of the cases, as nnU-Net's
``-part_id K -num_parts N`` does for prediction.

Shard ``K/N`` takes every ``N``-th item of the items sorted by name, starting at the ``K``-th:
``sorted(ids)[K::N]``. The parts are disjoint, together they are every item, their sizes differ by at most
one, and the assignment depends only on the set of ids and ``N`` (not on the machine, the order the ids
were listed in, or which other shards ran), so ``N`` processes on ``N`` machines need no coordination.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
_SPEC = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (0-based) of ``count`` parts; ``str(shard)`` is ``"K/N"``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard {self.index}/{self.count}: the number of parts N must be at least 1")
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: K must be in 0..{self.count - 1} (K/N is 0-based: "
                f"a Slurm array --array=0-{self.count - 1}, a Kubernetes JOB_COMPLETION_INDEX)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` -> ``Shard(K, N)``; anything else (``"x"``, ``"3/3"``, ``"-1/2"``) raises ValueError."""
        m = _SPEC.match(str(text))
        if m is None:
            raise ValueError(f"shard {text!r}: expected K/N, e.g. 0/4 (part K of N, K in 0..N-1)")
        return cls(int(m.group(1)), int(m.group(2)))

    def select(self, items: Sequence[T], key: Callable[[T], str] = str) -> list[T]:
        """This shard's items: ``sorted(items, key=key)[index::count]``."""
        return sorted(items, key=key)[self.index :: self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def owners(ids: Sequence[str], count: int) -> dict[str, Shard]:
    """``{id: the shard (of count) that processes it}`` for every id."""
    return {cid: Shard(k % count, count) for k, cid in enumerate(sorted(ids))}


def shard_from_options(
    shard: str | None, part_id: int | None, num_parts: int | None, parts_alone: bool = False
) -> Shard | None:
    """The shard of the command-line options ``--shard K/N`` or nnU-Net's ``--part-id K --num-parts N``
    (None when neither is given; ``parts_alone`` allows ``--num-parts`` without ``--part-id``, as
    ``preprocess --merge`` uses it). Raises ValueError with the message for the user."""
    if num_parts is not None and num_parts < 1:
        raise ValueError(f"--num-parts {num_parts}: N must be at least 1")
    if shard is not None:
        if part_id is not None or num_parts is not None:
            raise ValueError("give either --shard K/N or --part-id K --num-parts N, not both")
        return Shard.parse(shard)
    if part_id is None and (num_parts is None or parts_alone):
        return None
    if part_id is None or num_parts is None:
        raise ValueError("--part-id K and --num-parts N go together")
    return Shard(part_id, num_parts)
