"""benchmarks/bench_network.py still runs: one tiny step per network kind (no timing asserted)."""

from __future__ import annotations

import json

from tests.benchmark_module import load_benchmark


def test_bench_network_smoke(tmp_path, capsys):
    module = load_benchmark("bench_network")
    out = tmp_path / "steps.jsonl"
    specs = ["dynunet:4:16:32,32,16:1", "unet:4:16:32,32,16:1", "old_unet:4:16:32,32,16:1"]
    assert module.main(["--candidates", *specs, "--warmup", "0", "--steps", "1", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["candidate"] for r in rows] == specs and all(r["median_s"] > 0 for r in rows)
    assert "| dynunet | 4..16 | 32x32x16 x 1 |" in capsys.readouterr().out


def test_bench_network_times_float32_and_bf16_with_two_channels(tmp_path, capsys):
    module = load_benchmark("bench_network")
    out = tmp_path / "steps.jsonl"
    args = ["--candidates", "dynunet:4:16:32,32,16:1", "--channels", "2", "--amp", "off", "bf16", "--warmup", "0",
            "--steps", "1", "--json", str(out)]
    assert module.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["amp"] for r in rows] == ["off", "bf16"] and all(r["forward_s"][0] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| bf16 |" in printed and "| ratio |" in printed
