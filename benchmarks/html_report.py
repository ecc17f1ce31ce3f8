"""The HTML report of the SmolLM2 transformers-vs-llama.cpp diff: its size and how long
Chromium takes to draw it; optionally the README's screenshot of it.

    make demo   # records demo-out/reference.lsd and demo-out/llamacpp/candidate.lsd
    python benchmarks/html_report.py [demo-out] [--screenshot docs/html-report.png]

Prints the file size and, over several loads, the time from the start of the navigation to
the page drawn, on the page's own clock (``data-ready-ms``: reading and parsing the file,
then drawing), the drawing alone (``data-render-ms``), and the time from the DevTools
``Page.navigate`` command until ``data-ready`` is seen (adds the protocol's polling and, on
a busy machine, the wait for a renderer process). Targets: at most 2 MB, under 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/browser.py

import lockstep
from browser import Browser
from lockstep.report.html import write_html
from lockstep.report.json_report import report_dict


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo", nargs="?", default="demo-out")
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--screenshot", metavar="PNG")
    args = ap.parse_args()
    demo = Path(args.demo)
    result = lockstep.compare(demo / "reference.lsd", demo / "llamacpp" / "candidate.lsd")
    with tempfile.TemporaryDirectory() as tmp:
        page_path = Path(tmp) / "smollm2.html"
        write_html("comparison", report_dict(result), page_path)
        size = os.path.getsize(page_path)
        print(f"SmolLM2 transformers vs llama.cpp: verdict {result.verdict}, "
              f"{len(result.results)} pairs; HTML {size / 1e6:.2f} MB ({size} bytes)")
        with Browser(height=1500) as browser:
            loads, draws, ready = [], [], []
            for _ in range(args.loads):
                page = browser.open()
                loads.append(page.navigate(page_path.as_uri()))
                draws.append(float(page.eval("document.body.getAttribute('data-render-ms')")))
                ready.append(float(page.eval("document.body.getAttribute('data-ready-ms')")))
                assert page.console_errors() == [], page.console_errors()
                assert page.requests() == [page_path.as_uri()], page.requests()
            print(f"over {args.loads} loads, median (min-max): navigation start to drawn "
                  f"(the page's clock) {_ms(ready)}; of which drawing {_ms(draws)}; the "
                  f"navigation command to data-ready seen over CDP {_ms([x * 1e3 for x in loads])}")
            if args.screenshot:
                page.screenshot(args.screenshot, clip={"x": 0, "y": 0, "width": 1280,
                                                       "height": 1500})
                print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
