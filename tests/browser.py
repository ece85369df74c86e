"""Drive ``camfn app`` in a real browser: Debian's chromium through Playwright (its own browser download is
not used). Shared by tests/test_app.py and README's screenshot:

    python tests/browser.py docs/app.png    # start the app, explain the demo image with three methods, save
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The browser to drive: ``$CAMFN_CHROMIUM``, else the first of :data:`CHROMIUM_NAMES` on ``PATH``."""
    explicit = os.environ.get("CAMFN_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(*args: str, timeout: float = 90.0, log: Path | None = None) -> Iterator[str]:
    """Run ``python -m camfn app --host 127.0.0.1 --port <free> *args`` from the repository root; yield its URL
    once it answers, stop it afterwards. Its output goes to ``log`` (shown in the error if it never answers)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = log or Path(os.devnull)
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "camfn", "app", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    text = log.read_text(errors="replace") if log != Path(os.devnull) else ""
                    raise RuntimeError(f"camfn app exited with {server.returncode} before answering:\n{text}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as reply:
                        if reply.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"camfn app did not answer on {url} within {timeout:.0f} s")
                time.sleep(0.3)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def explained(page: Any, methods: list[str], timeout_ms: float = 60_000) -> None:
    """On a Playwright ``page`` of the app: tick ``methods`` (gradcam is preselected), click "Explain" and wait
    for one overlay per method."""
    page.locator("#camfn-image img").wait_for(timeout=timeout_ms)  # the page's first refresh has run
    for name in methods:
        page.get_by_label(name, exact=True).check()
    count = len({"gradcam", *methods})
    page.get_by_role("button", name="Explain").click()
    page.wait_for_function(
        f"document.querySelectorAll('#camfn-overlays img').length >= {count}", timeout=timeout_ms, polling=200
    )


def screenshot(path: Path, methods: tuple[str, ...] = ("layercam", "scorecam")) -> None:
    """Save a full-page screenshot of the app after explaining the demo image with gradcam and ``methods``."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit(f"no chromium found (looked for {', '.join(CHROMIUM_NAMES)}): apt-get install chromium")
    with serving() as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        explained(page, list(methods))
        page.wait_for_timeout(500)  # let the gallery finish drawing
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    print(f"wrote {path}")


if __name__ == "__main__":
    screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/app.png"))
