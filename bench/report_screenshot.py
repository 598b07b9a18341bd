"""Render a run's report.html to a PNG with headless Chromium (the call the tests make), e.g. to look at a
report on a machine without a browser or to attach it to an issue.

    python bench/report_screenshot.py runs/micro report.png                 # writes runs/micro/report.html first
    python bench/report_screenshot.py runs/micro report.png --height 6000   # the whole page of a long run
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.reporting.html_report import ChromiumMissing, screenshot, write_report  # noqa: E402
from training.stages import PIPELINE  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run's --out-dir (holding metrics.jsonl)")
    p.add_argument("png", help="where to write the screenshot")
    p.add_argument("--width", type=int, default=1280, help="window width in pixels (default 1280)")
    p.add_argument("--height", type=int, default=2400,
                   help="window height in pixels: what is below is cut (default 2400)")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.run_dir, "metrics.jsonl")):
        print(f"no metrics.jsonl in {args.run_dir}: pass the --out-dir of a run", file=sys.stderr)
        return 2
    try:
        html = write_report(args.run_dir, PIPELINE)
        screenshot(html, args.png, args.width, args.height)
    except (ChromiumMissing, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{html} -> {args.png} ({args.width}x{args.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
