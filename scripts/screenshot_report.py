"""Render a moe-sieve report in headless Chromium and save a PNG screenshot of the page.

    python scripts/screenshot_report.py STUDY/report.html --out report.png [--width 1200] [--height 4000]

Needs the Debian package ``chromium`` (``apt-get install chromium``) or ``--chromium PATH``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium(explicit: str | None = None) -> str:
    for name in (explicit, "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise FileNotFoundError("no Chromium found: install the Debian package 'chromium' or pass --chromium PATH")


def screenshot(
    html: str | Path, out: str | Path, width: int = 1200, height: int = 4000, chromium: str | None = None
) -> Path:
    """Load ``html`` from disk with network off and write a ``width`` x ``height`` PNG of the page."""
    html, out = Path(html).resolve(), Path(out).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html} not found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moe-sieve-chromium-") as profile:
        cmd = [
            find_chromium(chromium),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--proxy-server=127.0.0.1:9",  # self-contained page: any network request would fail
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            html.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html")
    parser.add_argument("--out", default="report.png")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.html, args.out, args.width, args.height, args.chromium)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(f"screenshot written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
