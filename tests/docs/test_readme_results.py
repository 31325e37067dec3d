"""The README's results table is the pinned default run's (``metrics/``), rendered by
benchmarks/readme_results.py; editing either alone fails here."""

from __future__ import annotations

from pathlib import Path

from tests.benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
readme_results = load_benchmark("readme_results")


def test_readme_table_matches_the_pinned_metrics():
    assert (ROOT / "metrics" / "metrics.json").is_file(), "commit metrics/ from `make repro`"
    assert readme_results.main(["--check"]) == 0


def test_the_check_fails_when_the_numbers_move(tmp_path):
    (tmp_path / "metrics").mkdir()
    metrics = {"cpm": 0.5, "cpm_ci95": {"low": 0.4, "high": 0.6}, "sensitivity_at_fp": {"1": 0.5},
               "dice": {"lesion": 0.7}, "hd95_mm": {"lesion": 3.0}, "lesions": 2, "lesions_detected": 1,
               "scans": 1, "false_positives": 0}
    import json
    (tmp_path / "metrics" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "metrics" / "train.json").write_text(json.dumps({"best_epoch": 3, "best_val_cpm": 1.0,
                                                                 "final_train_loss": 0.1}))
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{readme_results.BEGIN}\nold\n{readme_results.END}\ny\n")
    args = ["--metrics", str(tmp_path / "metrics"), "--readme", str(readme)]
    assert readme_results.main([*args, "--check"]) == 1
    assert readme_results.main(args) == 0 and readme_results.main([*args, "--check"]) == 0
    text = readme.read_text()
    assert "| CPM (95% bootstrap CI over scans) | 0.50 (0.40-0.60) |" in text and text.startswith("x\n")
    metrics["cpm"] = 0.51
    (tmp_path / "metrics" / "metrics.json").write_text(json.dumps(metrics))
    assert readme_results.main([*args, "--check"]) == 1
