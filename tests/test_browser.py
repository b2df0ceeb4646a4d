"""A real browser on the app: Debian's Chromium driven by Playwright (no browser download).

Uploads a shipped example image, types the class name, runs, and finds the result image and score on the
page; the screenshot is saved under test-artifacts/ (path printed).
"""

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

import app
import zsad

from app_server import serving_app

APP = Path(app.__file__)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = APP.parent / "test-artifacts"
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")


def test_upload_type_run_and_see_the_result(tmp_path):
    image_path, class_name = app.example_rows()[0]
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "browser_app_result.png"
    with serving_app(APP, "--tiny", log=tmp_path / "app.log") as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            expect(page.locator("#banner")).to_contain_text("Tiny random CLIP")
            page.locator("#input-image input[type=file]").set_input_files(image_path)
            expect(page.locator("#input-image img")).to_be_visible()  # the upload's preview
            page.locator("#class-name textarea").fill(class_name)
            page.locator("#run").click()

            score = page.locator("#score input")
            expect(score).not_to_have_value("")
            expect(page.locator("#overlay img").first).to_be_visible()
            expect(page.locator("#mask img")).to_be_visible()
            default_method = app.display_name(app.ordered_methods(zsad.METHODS)[0])
            expect(page.locator("#report")).to_contain_text(default_method)
            assert 0.0 <= float(score.input_value()) <= 1.0
            expect(page.locator("#runtime")).to_contain_text("Runs on CPU")
            page.locator("#full-resolution").click()
            expect(page.locator("#downloads")).to_contain_text(f"{Path(image_path).stem}_anomaly_map", timeout=TIMEOUT_MS)  # the upload's own name
            page.screenshot(path=str(screenshot), full_page=True)

            typed = "<img src=x onerror=alert(1)>"  # a product name that must stay text
            page.locator("#class-name textarea").fill(typed)
            page.locator("#run").click()
            expect(page.locator("#report")).to_contain_text(typed, timeout=TIMEOUT_MS)  # a new name: its text features first
            expect(page.locator("#report img")).to_have_count(0)
        finally:
            browser.close()
    print(f"\nscreenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
