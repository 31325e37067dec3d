"""Tests of pipeline.preprocessing (a package, so that module names such as test_stage do not collide)."""
