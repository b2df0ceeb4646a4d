"""A real browser on the app: Debian's Chromium driven by Playwright (no browser download).

Uploads a shipped example image, types the class name, runs, and finds the result image and score on the
page; on the Batch tab, uploads several images and finds their rows, overlays and downloads. Screenshots are saved
under test-artifacts/ (paths printed).
"""

import csv
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from zsad.space.config import display_name, offered_methods
from zsad.space.layout import example_rows
from zsad.space.testing import serving_app

APP = Path(__file__).resolve().parent.parent / "app.py"

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = APP.parent / "test-artifacts"
TIMEOUT_MS = 60_000

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")]


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    """A new page factory on one tiny-CLIP server and one browser for the module."""
    log = tmp_path_factory.mktemp("app") / "app.log"
    expect.set_options(timeout=TIMEOUT_MS)  # a first request with a new class name encodes its prompts (seconds)
    with serving_app(APP, "--tiny", log=log) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)

        def new_page():
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            return page

        try:
            yield new_page
        finally:
            browser.close()


def test_upload_type_run_and_see_the_result(browser_page):
    image_path, class_name = example_rows()[0]
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "browser_app_result.png"
    page = browser_page()
    expect(page.locator("#banner")).to_contain_text("Tiny random CLIP")
    page.locator("#input-image input[type=file]").set_input_files(image_path)
    expect(page.locator("#input-image img")).to_be_visible()  # the upload's preview
    page.locator("#class-name textarea").fill(class_name)
    page.locator("#run").click()

    score = page.locator("#score input")
    expect(score).not_to_have_value("")
    expect(page.locator("#overlay img").first).to_be_visible()
    expect(page.locator("#mask img")).to_be_visible()
    default_method = display_name(offered_methods({})[0])
    expect(page.locator("#report")).to_contain_text(default_method)
    assert 0.0 <= float(score.input_value()) <= 1.0
    expect(page.locator("#runtime")).to_contain_text("Runs on CPU")
    page.locator("#full-resolution").click()
    expect(page.locator("#downloads")).to_contain_text(f"{Path(image_path).stem}_anomaly_map")  # the upload's own name
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"\nscreenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000

    typed = "<img src=x onerror=alert(1)>"  # a product name that must stay text
    page.locator("#class-name textarea").fill(typed)
    page.locator("#run").click()
    expect(page.locator("#report")).to_contain_text(typed)  # a new name: its text features first
    expect(page.locator("#report img")).to_have_count(0)


def test_batch_tab_scores_every_file_and_offers_the_downloads(browser_page):
    images = [path for path, _ in example_rows()][:3]
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "browser_app_batch.png"
    page = browser_page()
    page.get_by_role("tab", name="Batch").click()
    page.locator("#batch-files input[type=file]").set_input_files(images)
    page.locator("#batch-class-name textarea").fill("metal nut")
    page.locator("#batch-run").click()

    expect(page.locator("#batch-summary")).to_contain_text(f"{len(images)} images scored: no verdict")  # the baseline, uncalibrated
    table = page.locator("#batch-table")
    for path in images:
        expect(table).to_contain_text(Path(path).name)
    expect(page.locator("#batch-gallery img")).to_have_count(len(images))
    expect(page.locator("#batch-masks a")).to_have_attribute("href", re.compile(r"/masks\.zip$"))
    with page.expect_download() as download:
        page.locator("#batch-csv a").click()
    rows = list(csv.reader(Path(download.value.path()).read_text().splitlines()))
    assert rows[0][:3] == ["file", "score", "verdict"] and [row[0] for row in rows[1:]] == [Path(path).name for path in images]
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"\nscreenshot: {screenshot}")


def test_two_reference_images_calibrate_the_result_unless_the_slider_is_chosen(browser_page, tmp_path):
    from zsad.data.synthetic import generate

    image_path, class_name = example_rows()[0]
    root = generate(tmp_path / "good", categories=[class_name], num_good=0, num_defective=0, image_size=96, num_train_good=2)
    references = sorted(str(path) for path in (root / class_name / "train" / "good").glob("*.png"))

    def detect_with_references(mode: str | None = None):
        page = browser_page()
        if mode:  # chosen before the uploads, as a visitor does: the page's state has settled by the time they run
            page.locator("#threshold-mode").get_by_label(mode, exact=True).check()
        page.locator("#input-image input[type=file]").set_input_files(image_path)
        page.locator("#class-name textarea").fill(class_name)
        page.locator("#references input[type=file]").set_input_files(references)
        expect(page.locator("#references tbody tr")).to_have_count(2)  # both uploaded
        page.locator("#run").click()
        return page

    page = detect_with_references()
    report = page.locator("#report")
    expect(report).to_contain_text("2 reference images of good parts; calibrated on 2 good images: at most 1 in 3 good parts flagged")
    calibrated = float(report.inner_text().split("image threshold ")[1].split(",")[0])
    shown = report.inner_text().split("(threshold ")[1].split(")")[0]
    # The verdict used the calibrated threshold (shown there with 2 decimals, in the calibration line with 3).
    assert abs(float(shown) - calibrated) <= 0.0051
    page.locator("#run").click()  # the same request again: the same threshold
    expect(report).to_contain_text(f"(threshold {shown})")
    expect(detect_with_references("slider").locator("#report")).to_contain_text("threshold 0.5 set by hand")

def test_a_method_picked_on_the_page_is_the_one_that_runs(browser_page):
    image_path, class_name = example_rows()[0]
    page = browser_page()
    page.locator("#input-image input[type=file]").set_input_files(image_path)
    page.locator("#class-name textarea").fill(class_name)
    picked = display_name(offered_methods({})[-1])
    page.locator("#method").get_by_text(picked).click()
    page.locator("#run").click()
    expect(page.locator("#report")).to_contain_text(f"{picked} (")
