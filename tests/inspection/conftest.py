"""Fixtures of the inspection tests: one hand-made evaluated workspace shared by the module's tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # inspection_workspace, also used by tests/notebooks

from inspection_workspace import Workspace, build_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """An evaluated workspace (read-only for the tests): 3 scans, 2 hits, 1 miss, 3 false positives."""
    return build_workspace(tmp_path_factory.mktemp("inspection_ws"), bootstrap=50, export=False)
