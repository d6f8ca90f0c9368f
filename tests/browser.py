"""Headless Chromium for the console's tests: Debian's `chromium` driven by Playwright (the `playwright` Python package,
dev extra; its own browser download is not used). `make test` installs both; where one is missing the tests that need a
browser are skipped with a message naming it. Screenshots go to .mlops/console-screenshots/ for a person to look at."""
import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
# the flags Chromium needs on a machine without internet (no background connections to Google's hosts) and as root
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / ".mlops" / "console-screenshots"


def browser():
    "A headless Chromium (module-scoped fixture: `browser = pytest.fixture(scope='module')(browser)`); skips naming what is missing."
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.skip("the console's browser tests need the Python package 'playwright' (dev extra: make test installs it)")
    if not Path(CHROMIUM).exists():
        pytest.skip("the console's browser tests need Chromium: Debian package 'chromium' (make test installs it with apt-get as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try: yield b
        finally: b.close()


class Page:
    "A browser tab that records the console errors and failed requests of what it loads."
    def __init__(self, browser, width=1400, height=1000):
        self.tab = browser.new_page(viewport={"width": width, "height": height})
        self.errors = []
        self.tab.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.tab.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.tab.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url} {r.failure}"))
        self.tab.on("response", lambda r: r.status >= 400 and self.errors.append(f"HTTP {r.status}: {r.url}"))

    def open(self, url: str):
        "Load `url`, wait until the network is idle; the page must load without console errors."
        response = self.tab.goto(url, wait_until="networkidle")
        assert response is not None and response.ok, f"{url}: {response and response.status}"
        assert not self.errors, f"{url}: {self.errors}"
        return self.tab

    def screenshot(self, name: str) -> Path:
        "A full-page screenshot at .mlops/console-screenshots/<name>.png."
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.tab.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000, f"{path}: the screenshot is nearly empty"
        return path

    def close(self): self.tab.close()


def drawn(tab, chart_id: str, timeout_ms: float = 30_000):
    "Wait until Plotly has drawn the chart `chart_id` (its script may still run after the network went idle on a busy machine)."
    tab.wait_for_function("id => { const el = document.getElementById(id); return !!(el && el.data); }", arg=chart_id, timeout=timeout_ms)


def chart_points(tab, chart_id: str) -> int:
    "How many data points Plotly drew in the chart `chart_id` (0 when it is not drawn)."
    # plotly.js's full data: arrays sent as typed arrays ({dtype, bdata} in the figure's JSON) are decoded there
    return tab.evaluate("""id => { const el = document.getElementById(id);
        const traces = el && (el._fullData || el.data);
        if (!traces) return 0;
        const size = a => !a ? 0 : (a.length !== undefined && a.length > 0 && a[0] !== null && typeof a[0] === "object")
            ? Array.from(a).reduce((m, row) => m + (row ? row.length || 0 : 0), 0) : (a.length || 0);
        return traces.reduce((n, t) => n + (t.z ? size(t.z) : size(t.y || t.x)), 0); }""", chart_id)


@contextlib.contextmanager
def serve_app(app):
    "Serve a Starlette app with uvicorn in a thread on a free loopback port; yields its base URL."
    sock = socket.socket(); sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started: time.sleep(0.02)
    try: yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
