"""What the report adds to a run: its build time and its size.

Usage: python bench/report_time.py OUTPUT_DIR [--rounds 3]

OUTPUT_DIR is a finished run's folder. Each round builds the report (its pictures drawn and
embedded, as at the end of every run). Prints the best of the rounds, the size of report.html
and how many pictures it embeds, and the share of the run's wall time (summary.json's wall_s,
which ends before the report starts) that the build adds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from align.report import REPORT, write_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    out = args.output_dir
    times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        write_report(out)
        times.append(time.perf_counter() - t)
    page = (out / REPORT).read_text()
    s = json.loads((out / "summary.json").read_text())
    pictures = page.count('src="data:image/jpeg')
    print(f"{s['images']} photos; run wall {s['wall_s']:.1f} s; report {min(times):.2f} s "
          f"({100 * min(times) / s['wall_s']:.2f}% of the run); report.html {len(page) / 1e6:.2f} MB "
          f"embedding {pictures} pictures")


if __name__ == "__main__":
    main()
