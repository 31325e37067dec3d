"""The README's results table for the embedded default, rendered from the pinned run's git-tracked metrics
(``metrics/metrics.json`` and ``metrics/train.json``, written by ``make repro``), so the table cannot drift
from the run it reports.

    python benchmarks/readme_results.py            # rewrite the table in README.md
    python benchmarks/readme_results.py --check    # exit 1 when README.md differs (tests/docs runs this)

After a change that moves the numbers: ``make repro``, then this script, and commit ``metrics/`` and the
README together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results-table:begin (benchmarks/readme_results.py) -->", "<!-- results-table:end -->"


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render(metrics: dict, train: dict) -> str:
    """The markdown table (between the markers) for the given ``metrics.json`` / ``train.json`` contents."""
    sens = metrics.get("sensitivity_at_fp", {})
    ci = metrics.get("cpm_ci95", {})
    rates = " / ".join(sens)
    lesion = next(iter(metrics.get("dice", {})), "lesion")
    rows = [
        ("CPM (95% bootstrap CI over scans)", f"{_f(metrics.get('cpm'))} ({_f(ci.get('low'))}-{_f(ci.get('high'))})"),
        (f"sensitivity at {rates} FPs per scan", " / ".join(_f(v) for v in sens.values())),
        ("lesions found (any score) / false-positive candidates",
         f"{metrics.get('lesions_detected')} of {metrics.get('lesions')} in {metrics.get('scans')} scans / "
         f"{metrics.get('false_positives')}"),
        (f"Dice / HD95 ({lesion})", f"{_f(metrics.get('dice', {}).get(lesion))} / "
                                    f"{_f(metrics.get('hd95_mm', {}).get(lesion), 1)} mm"),
        ("chosen checkpoint: epoch, validation CPM", f"{train.get('best_epoch')}, {_f(train.get('best_val_cpm'))}"),
        ("final training loss", _f(train.get("final_train_loss"), 4)),
    ]
    lines = ["| metric (test split; `metrics/metrics.json`, `metrics/train.json`) | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join([BEGIN, *lines, END])


def rendered_readme(readme: str, table: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md: the markers {BEGIN!r} ... {END!r} are missing")
    head, rest = readme.split(BEGIN, 1)
    return head + table + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's table differs")
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    metrics = json.loads((args.metrics / "metrics.json").read_text())
    train = json.loads((args.metrics / "train.json").read_text())
    readme = args.readme.read_text()
    new = rendered_readme(readme, render(metrics, train))
    if args.check:
        if new != readme:
            print(f"{args.readme}: the results table differs from {args.metrics}: run "
                  "python benchmarks/readme_results.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
