"""What the report adds to a run: its build time and its size on disk.

Usage: python bench/report_time.py OUTPUT_DIR [--rounds 3]

OUTPUT_DIR is a finished run's folder. Each round builds the report twice in this process:
cold (its pictures deleted first, as at the end of a job's first run) and warm (pictures kept,
as on a resumed run whose sampled records did not change). Prints the best of the rounds, the
size of report.html and of its pictures, and the share of the run's wall time (summary.json's
wall_s, which ends before the report starts) that the cold build adds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from align.report import PICTURES, REPORT, write_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    out = args.output_dir
    cold, warm = [], []
    for _ in range(args.rounds):
        shutil.rmtree(out / PICTURES, ignore_errors=True)
        t = time.perf_counter()
        write_report(out)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        write_report(out)
        warm.append(time.perf_counter() - t)
    pictures = list((out / PICTURES).iterdir())
    html = (out / REPORT).stat().st_size
    jpegs = sum(p.stat().st_size for p in pictures)
    s = json.loads((out / "summary.json").read_text())
    print(f"{s['images']} photos; run wall {s['wall_s']:.1f} s; report cold {min(cold):.2f} s "
          f"({100 * min(cold) / s['wall_s']:.2f}% of the run), warm {min(warm):.2f} s; "
          f"report.html {html / 1e3:.0f} kB + {len(pictures)} pictures {jpegs / 1e3:.0f} kB "
          f"= {(html + jpegs) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
