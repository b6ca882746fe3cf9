"""The playground page at `/`, in a real headless browser (Debian's chromium driven by
playwright; no browser download): type a prompt, watch partial images arrive, see the
retrieved documents. The test writes a screenshot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")
from serve_fixtures import start_server  # after the skips: it needs httpx

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (apt-get "
                                "install chromium)")
DEFAULTS_JSON = Path(__file__).resolve().parents[1] / "cm3rt" / "assets" / "default" / "defaults.json"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_playground_draws_row_by_row_and_lists_documents(tmp_path):
    server = start_server(tmp_path)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#prompt", "a red star above a blue circle")
            # The sources are kept in the page: a function exposed to Python is called
            # asynchronously, and its last call could still be in flight at "done".
            # Events that arrive in one network chunk set the src several times in one
            # task, and the observer sees them as one batch of records: each record's
            # old value is the value the change before it set, and the element holds
            # the last one.
            page.evaluate("""() => { window.imageSources = [];
                const image = document.getElementById('image');
                new MutationObserver((records) => {
                    const changes = records.filter((r) => r.attributeName === 'src');
                    if (!changes.length) return;
                    for (const r of changes.slice(1)) window.imageSources.push(r.oldValue);
                    window.imageSources.push(image.src);
                }).observe(image, {attributes: true, attributeOldValue: true,
                                   attributeFilter: ['src']}); }""")
            page.click("#go")
            page.wait_for_selector("body[data-state=done]", timeout=240_000)
            try:  # the observer's last callback runs after the change that set "done"
                page.wait_for_function("window.imageSources.length >= 4", timeout=5_000)
            except sync_api.TimeoutError:
                pass  # fewer changes than drawn images: the assertion below reports them
            sources = page.evaluate("window.imageSources")
            status = page.inner_text("#status")
            docs = page.locator("#docs li").all_inner_texts()
            page.screenshot(path=str(tmp_path / "playground.png"))
            browser.close()
        assert status.startswith("done:") and "3 partial images" in status, status
        # partial images, then the final one: the picture changed as it was drawn
        assert len(sources) == 4 and len(set(sources)) == 4
        assert all(s.startswith("data:image/png;base64,") for s in sources)
        k_docs = json.loads(DEFAULTS_JSON.read_text())["k_docs"]  # the shipped default
        assert k_docs >= 1 and len(docs) == k_docs and all(d.strip() for d in docs)
        assert (tmp_path / "playground.png").stat().st_size > 0
    finally:
        assert server.stop() == 0
