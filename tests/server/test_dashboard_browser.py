"""End-to-end: the dashboard in headless Chromium while load goes through the API; its panels update and
agree with /metrics. Set GLIDESERVE_UPDATE_SCREENSHOT=1 to refresh docs/dashboard.png (the README's)."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import httpx
from live_server import LiveServer, browser_marks, launch_chromium

from glideserve.server import ServerConfig

DOC_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
REQUESTS = 12
WAVES = 4

pytestmark = browser_marks()


def _metric(text: str, pattern: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{pattern} (\S+)$", text, re.M))


def _legend(page, key: str) -> float:
    return float(page.text_content(f'[data-metric="{key}"] b'))


def test_the_dashboard_follows_the_load_and_agrees_with_metrics(tmp_path):
    screenshot = DOC_SCREENSHOT if os.environ.get("GLIDESERVE_UPDATE_SCREENSHOT") else tmp_path / "dashboard.png"
    from playwright.sync_api import sync_playwright

    with LiveServer("glide-tiny", ServerConfig(model_id="glide-tiny", api_key="k3y", default_slo_ms=30000)) as server:
        headers = {"Authorization": "Bearer k3y"}

        def load() -> None:  # waves of concurrent requests, a second apart
            for wave in range(WAVES):
                threads = [threading.Thread(target=lambda i=i: httpx.post(
                    f"{server.api}/images/generations", headers=headers, timeout=120,
                    json={"prompt": "a red circle on a blue background", "seed": i, "num_inference_steps": 40}))
                    for i in range(REQUESTS)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                time.sleep(1.0)

        with sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(server.url + "/dashboard")
                page.wait_for_function("document.getElementById('error').textContent.includes('missing or wrong')")
                page.fill("#key", "k3y")
                page.dispatch_event("#key", "change")
                page.wait_for_function("document.getElementById('model').textContent === 'glide-tiny'")
                sender = threading.Thread(target=load)
                sender.start()
                sender.join()
                # While the load ran, the queue panel's history showed requests in the engine.
                page.wait_for_function("samples.some((s) => s.running > 0)", timeout=30_000)
                metrics = httpx.get(f"{server.url}/metrics").text
                completed = _metric(metrics, 'glideserve_requests_total{status="completed"}')
                page.wait_for_function("parseFloat(document.querySelector('[data-metric=\"completed_total\"] b')"
                                       f".textContent) === {completed}", timeout=30_000)
                page.wait_for_function("parseFloat(document.querySelector('[data-metric=\"running\"] b')"
                                       ".textContent) === 0", timeout=30_000)
                latency = page.text_content("#now-latency")
                hidden = page.eval_on_selector_all("section[hidden]", "els => els.map((e) => e.id)")
                screenshot.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
                queue = _legend(page, "queue_depth")
            finally:
                browser.close()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert completed >= REQUESTS * WAVES
    assert queue == _metric(metrics, "glideserve_queue_depth") == 0
    assert "SLO 30.00" in latency and "p50 –" not in latency
    assert set(hidden) == {"panel-cascade", "panel-finetune"}  # features that are off have no panel
    assert screenshot.stat().st_size > 0
