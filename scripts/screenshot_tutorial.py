"""Build the documentation and screenshot its tutorial page in headless Chromium.

Run from the repository root (needs the ``docs`` extra and Debian's ``chromium``)::

    python scripts/screenshot_tutorial.py [--out tutorial.png]

It builds the site with ``mkdocs build --strict`` into a temporary folder,
serves it on a free localhost port, and has Chromium (headless, sandbox and
GPU off, no background networking or component updates, a fresh profile)
save a full-height screenshot of ``tutorial/``: proof that the figures render.
It also checks that every ``<img>`` of the page points at a file the build
produced.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tutorial.png"))
    parser.add_argument("--height", type=int, default=6000, help="window height in pixels")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mpotn-site-") as site, \
            tempfile.TemporaryDirectory(prefix="mpotn-chromium-") as profile:
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                        "--site-dir", site], cwd=ROOT, check=True, env=env)
        page = Path(site) / "tutorial" / "index.html"
        images = re.findall(r'<img[^>]+src="([^"]+)"', page.read_text())
        missing = [src for src in images if not (page.parent / src).resolve().is_file()]
        if not images or missing:
            print(f"tutorial images: {len(images)}, missing: {missing}", file=sys.stderr)
            return 1
        port = free_port()
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=site)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                            f"--window-size=1280,{args.height}",
                            f"--screenshot={args.out.resolve()}",
                            f"http://127.0.0.1:{port}/tutorial/"],
                           check=True, capture_output=True, timeout=120)
        finally:
            server.shutdown()
    print(f"{len(images)} images on the tutorial page, all built; screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
