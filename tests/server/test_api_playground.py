"""End-to-end: the playground in headless Chromium submits a prompt, shows progress and images.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright``
Python package; the browser is the system one, so no browser download is involved.
The screenshot goes to a temporary folder; set GLIDESERVE_UPDATE_SCREENSHOT=1 to
refresh the README's docs/playground.png instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from live_server import LiveServer, browser_marks, launch_chromium

from glideserve.server import ServerConfig

DOC_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
BUNDLED_MODEL = "glide-tiny"
STEPS = 20
IMAGES = 3
PREVIEWS = 2

pytestmark = browser_marks()

# Records every text the progress labels show, so a run that is faster than the
# page's polling still proves that each step was displayed.
RECORD_STATUS = """() => {
  window.seenStatus = [];
  new MutationObserver(() => {
    document.querySelectorAll('#jobs .status').forEach((el) => window.seenStatus.push(el.textContent));
  }).observe(document.getElementById('jobs'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def toy_server():
    """The bundled toy model, so the screenshot shows real shapes rather than noise."""
    with LiveServer(BUNDLED_MODEL, ServerConfig(model_id=BUNDLED_MODEL)) as live:
        yield live


def test_playground_generates_with_live_progress_and_previews(toy_server, tmp_path):
    server = toy_server
    screenshot = DOC_SCREENSHOT if os.environ.get("GLIDESERVE_UPDATE_SCREENSHOT") else tmp_path / "playground.png"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('ready')")
            page.fill("#prompt", "a red circle on a blue background")
            page.fill("#steps", str(STEPS))
            page.fill("#n", str(IMAGES))
            page.fill("#seed", "7")
            page.fill("#partials", str(PREVIEWS))
            page.evaluate(RECORD_STATUS)
            page.click("#generate")
            page.wait_for_function(f"document.querySelectorAll('#gallery figure img').length === {IMAGES}")
            page.wait_for_function("document.querySelector('#generate').disabled === false")
            seen = page.evaluate("window.seenStatus")
            statuses = page.locator("#jobs .status").all_text_contents()
            error = page.text_content("#error")
            page.wait_for_function("parseFloat(document.getElementById('stat-rate').textContent) > 0")
            screenshot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            sources = page.eval_on_selector_all("#gallery img", "els => els.map((e) => e.src)")
            previews = page.locator("#jobs .previews img").count()
        finally:
            browser.close()
    assert error == ""
    assert statuses == [f"done · step {STEPS}/{STEPS}"] * IMAGES
    assert any(text.startswith("step ") and text != f"step {STEPS}/{STEPS}" for text in seen), seen
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert previews == IMAGES * PREVIEWS
    assert screenshot.stat().st_size > 0
