"""The Space's request handler and page, in-process and offline with the tiny CLIP (no server)."""

import base64
import csv
import importlib.util
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import app
import zsad
from zsad.errors import ZSADError
from zsad.inference import AnomalyDetector
from zsad.modeling.prompting import prompt_ensemble_features

from conftest import TEST_IMAGE_SIZE

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector.load(methods=app.ordered_methods(zsad.METHODS), clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


@pytest.fixture(scope="module")
def detect(detector):
    return app.make_handler(detector)


def upload(path: Path) -> dict:
    """The payload Gradio hands an unprocessed image input after an upload."""
    return {"path": str(path), "url": None, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.parametrize("kind", ["rgb", "gray16", "cmyk", "rgba", "gray", "exif_rotated"])
def test_every_image_kind_gives_overlay_mask_score_and_report(detect, good_files, kind):
    path, size = good_files[kind]
    (original, overlay), mask, score, report, rows, views, slider, downloads, last = detect(upload(path), "bottle", "baseline", 0.5)
    assert original.size == overlay.size == mask.size == size  # the image's own (upright) size
    assert original.mode == overlay.mode == "RGB" and mask.mode == "L"
    assert 0.0 <= score <= 1.0
    verdict = "anomalous" if score >= 0.5 else "normal"
    assert f"**{verdict}**" in report and "CLIP baseline (training-free)" in report and "request took" in report
    assert rows[0][:4] == ["CLIP baseline", "training-free", score, verdict]
    assert views == []  # the gallery is for compare mode
    assert "No reference images (zero-shot); uncalibrated (threshold 0.5)" in report and slider["move"] is False
    assert downloads is None and last.original_size == size  # full-resolution files are made on request


def test_mask_matches_the_threshold(detect, good_files):
    path, _ = good_files["rgb"]
    everything = detect(upload(path), "bottle", "baseline", 0.0)[1]
    nothing = detect(upload(path), "bottle", "baseline", 1.0)[1]
    assert np.asarray(everything).min() == 255
    fraction = detect(upload(path), "bottle", "baseline", 0.5)[4][0][4]
    assert 0.0 <= fraction <= 100.0 and np.asarray(nothing).mean() <= np.asarray(everything).mean()


def test_compare_shows_every_method_side_by_side(detect, detector, good_files):
    path, _ = good_files["rgb"]
    (_, overlay), _, score, report, rows, views, *_ = detect(upload(path), "bottle", app.COMPARE, 0.5)
    names = [app.display_name(method) for method in detector.method_names]
    assert [row[0] for row in rows] == names
    assert [caption for _, caption in views[:2]] == [f"{names[0]}: {score:.3f} {rows[0][3]}", f"{names[0]}: mask at 0.50"]
    assert len(views) == 2 * len(names)
    assert all(f"### {name} (" in report for name in names)
    assert score == rows[0][2]  # the first method's score is the headline


@pytest.mark.skipif("genclip" not in zsad.METHODS, reason="GenCLIP not registered")
def test_genclip_report_states_the_class_name_filter_decision(detect, good_files):
    path, _ = good_files["rgb"]
    report = detect(upload(path), "bottle", "genclip", 0.5)[3]
    assert "GenCLIP (untrained)" in report
    assert "Class name filter (hard): kept “bottle”" in report or "“bottle” does not fit the image" in report


def test_clipboard_data_url_is_read(detect, good_files):
    path, size = good_files["rgb"]
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    (original, _), *_ = detect({"path": None, "url": url}, "bottle", "baseline", 0.5)
    assert original.size == size


@pytest.mark.parametrize(
    "make_image, class_name, method, threshold, message",
    [
        (lambda files: None, "bottle", "baseline", 0.5, "No image was given"),
        (lambda files: upload(files["unreadable"]), "bottle", "baseline", 0.5, "Not a readable image"),
        (lambda files: upload(files["truncated"]), "bottle", "baseline", 0.5, "truncated"),
        (lambda files: upload(files["bomb"]), "bottle", "baseline", 0.5, "20000x20000"),
        (lambda files: upload(files["missing"]), "bottle", "baseline", 0.5, "not found"),
        (lambda files: upload(files["good"]), "", "baseline", 0.5, "class name is empty"),
        (lambda files: upload(files["good"]), "a" * 500, "baseline", 0.5, "500 characters"),
        (lambda files: upload(files["good"]), "bottle", "nosuch", 0.5, "Unknown method"),
        (lambda files: upload(files["good"]), "bottle", "baseline", 7, "between 0 and 1"),
    ],
)
def test_user_errors_become_gradio_errors_and_the_handler_keeps_working(
    detect, bad_files, good_files, make_image, class_name, method, threshold, message
):
    files = {**bad_files, "good": good_files["rgb"][0], "missing": bad_files["bomb"].with_name("gone.png")}
    with pytest.raises(gr.Error, match=message):
        detect(make_image(files), class_name, method, threshold)
    assert 0.0 <= detect(upload(good_files["rgb"][0]), "bottle", "baseline", 0.5)[2] <= 1.0


def test_page_has_the_detect_endpoint_and_every_method(detector):
    demo = app.build_demo(detector, tiny=True)
    assert isinstance(demo, gr.Blocks)
    assert [fn.api_name for fn in demo.fns.values()].count("detect") == 1
    methods = [value for _, value in app.method_choices(detector)]
    assert methods == detector.method_names + [app.COMPARE]
    notice = app.banner(detector, tiny=True)
    assert "Tiny random CLIP" in notice
    untrained = [app.display_name(m) for m in detector.method_names if detector.status(m) == "untrained"]
    assert all(name in notice for name in untrained) and ("untrained" in notice) == bool(untrained)


def test_examples_exist_and_are_readable():
    rows = app.example_rows()
    assert rows, "examples/examples.json lists the shipped example images"
    for path, class_name in rows:
        image = zsad.images.load_image(path)
        assert min(image.size) >= 16 and class_name.strip()


def test_examples_are_what_the_synthetic_generator_makes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_examples", REPO / "examples" / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    rows = make_examples.make_examples(tmp_path)
    assert [[str(app.EXAMPLES_DIR / row["image"]), row["class_name"]] for row in rows] == app.example_rows()
    for row in rows:
        regenerated, shipped = Image.open(tmp_path / row["image"]), Image.open(app.EXAMPLES_DIR / row["image"])
        np.testing.assert_array_equal(np.asarray(regenerated), np.asarray(shipped))


def test_checkpoints_come_from_environment_and_flags():
    environ = {app.checkpoint_variable(method): f"env/{method}" for method in zsad.METHODS}
    flagged = app.configured_checkpoints(["baseline=/local/ckpt"], environ)
    assert flagged["baseline"] == "/local/ckpt"
    assert all(flagged[method] == f"env/{method}" for method in zsad.METHODS if method != "baseline")
    assert app.configured_checkpoints([], {}) == {}
    with pytest.raises(ZSADError, match="METHOD=PATH"):
        app.configured_checkpoints(["stackclip"], {})


def run_app(*arguments, timeout=60):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "app.py", *arguments], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def test_help_works_without_loading_anything():
    result = run_app("--help")
    assert result.returncode == 0 and "--tiny" in result.stdout and "GRADIO_SERVER_PORT" in result.stdout


def test_missing_backbone_exits_with_a_short_hint(tmp_path):
    result = run_app("--clip", str(tmp_path / "no-clip-here"))
    assert result.returncode != 0
    assert "--clip PATH" in result.stderr and "--tiny" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 4


def test_gradio_gets_each_requests_images_as_files_of_their_own(detect, good_files):
    """Gradio rewrites a returned PIL image's cache file in place on every identical request (a client still
    downloading it gets a truncated file); files are copied atomically instead."""
    path, size = good_files["rgb"]
    files = app.ImageFiles(keep=2)
    serve = app.serving_files(detect, files)
    outputs = [serve(upload(path), "bottle", app.COMPARE, 0.5) for _ in range(3)]
    (original, overlay), mask, score, _, _, views, *_ = outputs[-1]
    served = [original, overlay, mask, *(image for image, _ in views)]
    assert all(isinstance(file, str) and Path(file).is_file() for file in served)
    assert len(set(served)) == len(served)  # one file per image
    assert [Image.open(file).size for file in served] == [size] * len(served)
    reference_mask = detect(upload(path), "bottle", app.COMPARE, 0.5)[1]
    np.testing.assert_array_equal(np.asarray(Image.open(mask)), np.asarray(reference_mask))  # PNG: exact
    assert Path(outputs[1][1]).is_file() and not Path(outputs[0][1]).exists()  # the oldest request's folder is gone
    assert score == outputs[0][2]


# ----- the batch tab --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Three image files of different sizes, and a zip with two more images in a folder, a text file, a macOS
    resource-fork copy and an image file that does not decode."""
    folder = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(1)
    arrays = {f"part{i}.png": rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(5)}
    files = []
    for name in list(arrays)[:3]:
        Image.fromarray(arrays[name]).save(folder / name)
        files.append(str(folder / name))
    archive = folder / "more.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in list(arrays)[3:]:
            buffer = io.BytesIO()
            Image.fromarray(arrays[name]).save(buffer, format="PNG")
            zipped.writestr(f"line2/{name}", buffer.getvalue())
        zipped.writestr("line2/notes.txt", "not an image")
        zipped.writestr("__MACOSX/line2/._part3.png", b"resource fork")
        zipped.writestr("line2/broken.png", b"not a png at all")
    return files + [str(archive)], arrays


def test_batch_of_files_and_a_zip_gives_table_csv_masks_and_gallery(detector, parts):
    uploads, arrays = parts
    detect_batch = app.make_batch_handler(detector, app.ImageFiles())
    table, views, csv_path, masks_path, summary = detect_batch(uploads, "metal nut", "stackclip", 0.5)

    names = ["part0.png", "part1.png", "part2.png", "line2/part3.png", "line2/part4.png", "line2/broken.png"]
    assert [row[0] for row in table] == names
    with open(csv_path, newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [record["file"] for record in records] == names
    for record, name in zip(records[:5], names):
        expected = detector.detect(arrays[Path(name).name], "metal nut", method="stackclip", threshold=0.5)
        assert float(record["score"]) == pytest.approx(expected.score, abs=1e-6)
        assert record["verdict"] == expected.verdict and record["error"] == ""
        assert float(record["anomalous_pixel_percent"]) == pytest.approx(100 * expected.mask.mean(), abs=0.01)
    assert records[5]["verdict"] == "unreadable" and "Not a readable image" in records[5]["error"] and records[5]["score"] == ""
    assert table[5][1] is None and table[0][1] == round(float(records[0]["score"]), 4)

    with zipfile.ZipFile(masks_path) as masks:
        assert masks.namelist() == [f"{os.path.splitext(name)[0]}_mask.png" for name in names[:5]]
        mask = Image.open(io.BytesIO(masks.read("line2/part4_mask.png")))
        assert mask.mode == "L" and mask.size == (56, 72)  # the image's own size
    assert len(views) == 5 and views[3][1].startswith("line2/part3.png: ")
    assert all(max(Image.open(path).size) <= app.THUMBNAIL_SIDE for path, _ in views)
    anomalous = sum(record["verdict"] == "anomalous" for record in records)
    assert f"{anomalous} of 5 images anomalous" in summary and app.escaped("line2/broken.png") + ": Not a readable image" in summary


def test_repeated_file_names_are_told_apart(detector, parts):
    uploads, _ = parts
    table = app.make_batch_handler(detector, app.ImageFiles())(uploads[:1] * 2, "screw", "baseline", 0.5)[0]
    assert [row[0] for row in table] == ["part0.png", "part0 (2).png"]
    assert table[0][1:] == table[1][1:]


@pytest.mark.parametrize(
    ("caps", "uploads", "class_name", "message"),
    [
        (app.BatchCaps(max_images=4), "all", "screw", r"holds 6 images; the Space takes at most 4 at a time\. Split it"),
        (app.BatchCaps(max_megabytes=0.001), "all", "screw", r"MB of images \(zips counted uncompressed\).*at most 0\.001 MB"),
        (app.BatchCaps(), "none", "screw", "holds no images"),
        (app.BatchCaps(), "text zip", "screw", "holds no images"),
        (app.BatchCaps(), "bad zip", "screw", "bad.zip is not a readable zip archive"),
        (app.BatchCaps(), "all", " ", "class name is empty"),
    ],
)
def test_batch_caps_and_errors_are_clear_messages(detector, parts, tmp_path, caps, uploads, class_name, message):
    text_zip, bad_zip = tmp_path / "texts.zip", tmp_path / "bad.zip"
    with zipfile.ZipFile(text_zip, "w") as zipped:
        zipped.writestr("readme.txt", "no images here")
    bad_zip.write_bytes(b"PK but not really")
    choices = {"all": parts[0], "none": [], "text zip": [str(text_zip)], "bad zip": [str(bad_zip)]}
    with pytest.raises(gr.Error, match=message):
        app.make_batch_handler(detector, app.ImageFiles(), caps)(choices[uploads], class_name, "baseline", 0.5)


def test_page_has_both_endpoints_and_the_batch_group(detector):
    demo = app.build_demo(detector, tiny=True)
    functions = {fn.api_name: fn for fn in demo.fns.values()}
    assert {"detect", "detect_batch"} <= set(functions)
    assert functions["detect_batch"].concurrency_id == app.BATCH_CONCURRENCY_ID != functions["detect"].concurrency_id


def test_a_waiting_single_request_goes_before_the_next_batch_chunk():
    turns, order = app.ComputeTurns(), []
    chunk_running, finish_chunk = threading.Event(), threading.Event()

    def batch():
        with turns.batch_chunk():
            chunk_running.set()
            finish_chunk.wait(10)
            order.append("chunk 1")
        with turns.batch_chunk():
            order.append("chunk 2")

    def single():
        with turns.single():
            order.append("single")

    batch_thread = threading.Thread(target=batch)
    batch_thread.start()
    assert chunk_running.wait(10)
    single_thread = threading.Thread(target=single)
    single_thread.start()
    deadline = time.monotonic() + 10
    while turns._singles_waiting == 0 and time.monotonic() < deadline:  # the single request is waiting for its turn
        time.sleep(0.01)
    finish_chunk.set()
    batch_thread.join(10)
    single_thread.join(10)
    assert order == ["chunk 1", "single", "chunk 2"]


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from zsad.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("product"), categories=["disk", "wood"], num_good=1, num_defective=1, image_size=64,
                    num_train_good=3)


def good_parts(root: Path, category: str = "disk") -> list[dict]:
    return [upload(path) for path in sorted((root / category / "train" / "good").glob("*.png"))]


def test_references_calibrate_the_verdict_and_move_the_slider_once_per_set(detector, product):
    profiles = app.ReferenceProfiles(detector)
    detect = app.make_handler(detector, profiles)
    image = upload(next((product / "disk" / "test").rglob("*.png")))
    _, _, _, report, rows, _, slider, *_ = detect(image, "disk", "baseline", 0.5, good_parts(product))
    calibration = profiles.get(good_parts(product), "disk", "baseline")["baseline"].calibration
    assert "3 reference images of good parts; calibrated on 3 good images: image threshold" in report
    assert f"image threshold {calibration.image_threshold:.3f}, pixel threshold {calibration.pixel_threshold:.3f}" in report
    assert slider == {"value": round(calibration.image_threshold, 2), "move": True}
    assert app.slider_at_calibrated_value(slider, 0.5) == slider["value"]
    # The same references again (the slider now at the calibrated value): the profile is reused, still calibrated.
    _, _, _, report, _, _, again, *_ = detect(image, "disk", "baseline", slider["value"], good_parts(product), slider)
    assert profiles.builds == 1 and "calibrated on 3 good images:" in report and again["value"] == slider["value"]
    # The user moves the slider: their threshold applies to mask and verdict.
    _, _, _, report, _, _, moved, *_ = detect(image, "disk", "baseline", 0.3, good_parts(product), slider)
    assert "threshold 0.3 set by hand" in report and moved == {"value": slider["value"], "move": False}
    assert app.slider_at_calibrated_value(moved, 0.3) == 0.3
    detect(image, "disk", app.COMPARE, 0.5, good_parts(product))
    assert profiles.builds == 2  # compare mode: one profile per method, built together


def test_bad_references_are_clear_messages_and_the_app_keeps_serving(detector, product, bad_files):
    detect = app.make_handler(detector)
    image = upload(next((product / "disk" / "test").rglob("*.png")))
    with pytest.raises(gr.Error, match="Reference image 2: Not a readable image"):
        detect(image, "disk", "baseline", 0.5, [good_parts(product)[0], upload(bad_files["unreadable"])])
    with pytest.raises(gr.Error, match=f"200 reference images were given; at most {app.MAX_REFERENCES} are used"):
        detect(image, "disk", "baseline", 0.5, good_parts(product)[:1] * 200)
    report = detect(image, "disk", "baseline", 0.5, [])[3]
    assert "No reference images (zero-shot)" in report
    one = detect(image, "disk", "baseline", 0.5, good_parts(product)[:1])[3]
    assert "1 reference image of good parts; uncalibrated (threshold 0.5) (calibration needs at least two" in one
    other_product = detect(upload(next((product / "wood" / "test").rglob("*.png"))), "disk", "baseline", 0.5, good_parts(product))[3]
    assert "does not look like the reference images" in other_product


def test_a_product_name_is_shown_as_typed_never_as_html(detector, good_files):
    from markdown_it import MarkdownIt

    path, _ = good_files["rgb"]
    typed = "<img src=x onerror=alert(1)> *bold* [link](http://x)"
    report = app.make_handler(detector)(path, typed, "genclip", 0.5)[3]
    rendered = MarkdownIt("commonmark").render(report)
    assert "<img" not in rendered and "<em>" not in rendered and "<a " not in rendered
    assert "&lt;img src=x onerror=alert(1)&gt; *bold* [link](http://x)" in rendered  # the visitor's text, as text


def test_example_names_warm_in_the_background_taking_turns_with_requests(fresh_backbone, monkeypatch):
    detector = AnomalyDetector.load(methods=["baseline"], clip=fresh_backbone, image_size=TEST_IMAGE_SIZE)
    turns = app.ComputeTurns()
    with turns.single():  # a request in progress: the warm-up waits for it
        thread = app.warm_example_names(detector, ["metal_nut", "capsule", "metal nut"], turns)
        thread.join(timeout=0.5)
        assert thread.is_alive() and len(fresh_backbone._frozen_features) == 0
    thread.join(timeout=60)
    assert not thread.is_alive() and len(fresh_backbone._frozen_features) == 2  # "metal_nut" is "metal nut"
    warmed = prompt_ensemble_features(fresh_backbone, ["capsule", "metal nut"])
    monkeypatch.setattr(fresh_backbone, "encode_prompts", lambda *args: pytest.fail("a warmed name was encoded again"))
    torch.testing.assert_close(detector.model("baseline").class_text_features(["metal nut", "capsule"]), warmed.flip(0))
