"""Tests of pipeline/training (and its benchmark fixtures)."""
