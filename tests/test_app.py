"""The Space's request handler and page, in-process and offline with the tiny CLIP (no server)."""

import base64
import importlib.util
import os
import subprocess
import sys
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
    (original, overlay), mask, score, report, rows, views = detect(upload(path), "bottle", "baseline", 0.5)
    assert original.size == overlay.size == mask.size == size  # the image's own (upright) size
    assert original.mode == overlay.mode == "RGB" and mask.mode == "L"
    assert 0.0 <= score <= 1.0
    verdict = "anomalous" if score >= 0.5 else "normal"
    assert f"**{verdict}**" in report and "CLIP baseline (training-free)" in report and "request took" in report
    assert rows[0][:4] == ["CLIP baseline", "training-free", score, verdict]
    assert views == []  # the gallery is for compare mode


def test_mask_matches_the_threshold(detect, good_files):
    path, _ = good_files["rgb"]
    everything = detect(upload(path), "bottle", "baseline", 0.0)[1]
    nothing = detect(upload(path), "bottle", "baseline", 1.0)[1]
    assert np.asarray(everything).min() == 255
    fraction = detect(upload(path), "bottle", "baseline", 0.5)[4][0][4]
    assert 0.0 <= fraction <= 100.0 and np.asarray(nothing).mean() <= np.asarray(everything).mean()


def test_compare_shows_every_method_side_by_side(detect, detector, good_files):
    path, _ = good_files["rgb"]
    (_, overlay), _, score, report, rows, views = detect(upload(path), "bottle", app.COMPARE, 0.5)
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
    (original, overlay), mask, score, _, _, views = outputs[-1]
    served = [original, overlay, mask, *(image for image, _ in views)]
    assert all(isinstance(file, str) and Path(file).is_file() for file in served)
    assert len(set(served)) == len(served)  # one file per image
    assert [Image.open(file).size for file in served] == [size] * len(served)
    reference_mask = detect(upload(path), "bottle", app.COMPARE, 0.5)[1]
    np.testing.assert_array_equal(np.asarray(Image.open(mask)), np.asarray(reference_mask))  # PNG: exact
    assert Path(outputs[1][1]).is_file() and not Path(outputs[0][1]).exists()  # the oldest request's folder is gone
    assert score == outputs[0][2]


def test_example_names_warm_in_the_background_taking_turns_with_requests(fresh_backbone, monkeypatch):
    detector = AnomalyDetector.load(methods=["baseline"], clip=fresh_backbone, image_size=TEST_IMAGE_SIZE)
    with app.MODEL_LOCK:  # a request in progress: the warm-up waits for it
        thread = app.warm_example_names(detector, ["metal_nut", "capsule", "metal nut"])
        thread.join(timeout=0.5)
        assert thread.is_alive() and len(fresh_backbone._frozen_features) == 0
    thread.join(timeout=60)
    assert not thread.is_alive() and len(fresh_backbone._frozen_features) == 2  # "metal_nut" is "metal nut"
    warmed = prompt_ensemble_features(fresh_backbone, ["capsule", "metal nut"])
    monkeypatch.setattr(fresh_backbone, "encode_prompts", lambda *args: pytest.fail("a warmed name was encoded again"))
    torch.testing.assert_close(detector.model("baseline").class_text_features(["metal nut", "capsule"]), warmed.flip(0))
