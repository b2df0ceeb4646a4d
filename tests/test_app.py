"""The Space's modules (zsad/space/) in-process and offline with the tiny CLIP (no server): handlers, intake,
outputs, rendering, scheduling and the page."""

import base64
import csv
import dataclasses
import importlib.util
import io
import os
import re
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

import zsad
from zsad import AnomalyDetector, ZSADError
from zsad.modeling.prompting import prompt_ensemble_features
from zsad.runtime.loading import load_model
from zsad.space import config, files, handlers, layout, render, scheduling, uploads
from zsad.space.config import COMPARE, DISPLAY_SIDE, REFERENCE_SIDE, BatchCaps, ReferenceCaps, display_name
from zsad.space.testing import upload

from conftest import TEST_IMAGE_SIZE

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector.load(methods=config.ordered_methods(zsad.METHODS), clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


@pytest.fixture(scope="module")
def detect(detector):
    return handlers.make_handler(detector)


@pytest.mark.parametrize("kind", ["rgb", "gray16", "cmyk", "rgba", "gray", "exif_rotated"])
def test_every_image_kind_gives_overlay_mask_score_and_report(detect, good_files, kind):
    path, size = good_files[kind]
    output = detect(upload(path), "bottle", "baseline", 0.5, None, False, handlers.SLIDER)
    original, overlay = output.pair
    assert original.size == overlay.size == output.mask.size == size  # the image's own (upright) size
    assert original.mode == overlay.mode == "RGB" and output.mask.mode == "L"
    assert 0.0 <= output.score <= 1.0
    verdict = "anomalous" if output.score >= 0.5 else "normal"
    assert f"**{verdict}**" in output.report and "CLIP baseline (training-free)" in output.report and "request took" in output.report
    assert output.table[0][:4] == ["CLIP baseline", "training-free", output.score, verdict]
    assert output.gallery == []  # the gallery is for compare mode
    assert "No reference images (zero-shot); uncalibrated (threshold 0.5 set by hand)" in output.report
    assert output.full_resolution.original_size == size  # full-resolution files are made on request
    assert output.as_gradio()[6] is None and len(output.as_gradio()) == 8  # the last request's downloads are cleared


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_mask_matches_the_threshold(detect, detector, good_files, threshold):
    path, _ = good_files["rgb"]
    output = detect(upload(path), "bottle", "baseline", threshold, None, False, handlers.SLIDER)
    expected = detector.detect(str(path), "bottle", method="baseline", threshold=threshold, display_side=DISPLAY_SIDE)
    np.testing.assert_array_equal(np.asarray(output.mask) > 0, expected.anomaly_map >= threshold)
    assert output.table[0][4] == round(100.0 * float((expected.anomaly_map >= threshold).mean()), 2)
    if threshold == 0.0:
        assert np.asarray(output.mask).min() == 255


def test_compare_shows_every_method_side_by_side(detect, detector, good_files):
    path, _ = good_files["rgb"]
    output = detect(upload(path), "bottle", COMPARE, 0.5)
    names = [display_name(method) for method in detector.method_names]
    assert [row[0] for row in output.table] == names
    assert [caption for _, caption in output.gallery[:2]] == [f"{names[0]}: {output.score:.3f}",  # untrained: no verdict
                                                              f"{names[0]}: mask at 0.50"]
    assert len(output.gallery) == 2 * len(names)
    assert all(f"### {name} (" in output.report for name in names)
    assert output.score == output.table[0][2]  # the first method's score is the headline


def test_an_untrained_result_says_what_its_map_is_worth_and_what_is_stronger(detect, detector, good_files):
    path, _ = good_files["rgb"]
    report = detect(upload(path), "bottle", COMPARE, 0.5).report
    assert report.count("38.4 pixel AUROC on MVTec AD") == len(detector.method_names)  # none is trained here
    assert "Reference images of good parts, and scoring a batch of parts against each other (Batch tab)" in report
    trained = dataclasses.replace(detector.detect(str(path), "bottle", method="baseline"), status="trained")
    assert render.UNTRAINED_MAP_NOTE not in render.report([trained])


@pytest.mark.parametrize("threshold, kept", [(0.0, True), (1.01, False)])  # every probability reaches 0.0, none 1.01
def test_genclip_report_states_the_class_name_filter_decision(tiny_backbone, good_files, threshold, kept):
    genclip = load_model("genclip", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE, cnf_threshold=threshold, cnf_top_k=0)
    detector = AnomalyDetector(tiny_backbone, {"genclip": genclip})
    path, _ = good_files["rgb"]
    output = handlers.make_handler(detector)(upload(path), "bottle", "genclip", 0.5)
    choice = detector.detect(str(path), "bottle", method="genclip", display_side=DISPLAY_SIDE).details.class_name
    assert choice.kept is kept
    evidence = f"(CLIP probability {choice.probability:.2f})"
    assert "GenCLIP (untrained)" in output.report
    if kept:
        assert f"Class name filter (hard): kept “bottle” {evidence}" in output.report and "does not fit" not in output.report
    else:
        assert f"Class name filter (hard): “bottle” does not fit the image {evidence}; used “object”" in output.report


def test_clipboard_data_url_is_read(detect, good_files):
    path, size = good_files["rgb"]
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert detect({"path": None, "url": url}, "bottle", "baseline", 0.5).pair[0].size == size
    with pytest.raises(gr.Error, match="Not a readable image 'the pasted image'") as caught:
        detect({"path": None, "url": "data:image/png;base64," + base64.b64encode(b"no picture").decode()}, "bottle", "baseline", 0.5)
    assert "BytesIO" not in str(caught.value)


@pytest.mark.parametrize(
    "make_image, class_name, method, threshold, message",
    [
        (lambda files: None, "bottle", "baseline", 0.5, "No image was given"),
        (lambda files: upload(files["unreadable"]), "bottle", "baseline", 0.5, "Not a readable image"),
        (lambda files: upload(files["truncated"]), "bottle", "baseline", 0.5, "truncated"),
        (lambda files: upload(files["bomb"]), "bottle", "baseline", 0.5, "400000000 pixels"),
        (lambda files: upload(files["good"]), "", "baseline", 0.5, "class name is empty"),
        (lambda files: upload(files["good"]), "a" * 500, "baseline", 0.5, "500 characters"),
        (lambda files: upload(files["good"]), "bottle", "nosuch", 0.5, "Unknown method"),
        (lambda files: upload(files["good"]), "bottle", "baseline", 7, "between 0 and 1"),
        (lambda files: upload(files["good"]), "bottle", "baseline", True, "between 0 and 1, got True"),  # not 1.0
        (lambda files: upload(files["good"]), "bottle", ["baseline"], 0.5, r"'method' must be one method name .a string., got \['baseline'\]"),
    ],
)
def test_user_errors_become_gradio_errors_and_the_handler_keeps_working(
    detect, bad_files, good_files, make_image, class_name, method, threshold, message
):
    files = {**bad_files, "good": good_files["rgb"][0]}
    with pytest.raises(gr.Error, match=message):
        detect(make_image(files), class_name, method, threshold)
    assert 0.0 <= detect(upload(good_files["rgb"][0]), "bottle", "baseline", 0.5).score <= 1.0


def test_only_files_in_gradios_upload_cache_are_read_and_a_refusal_does_not_tell_if_a_path_exists(detect, good_files, tmp_path):
    path, _ = good_files["rgb"]
    uploaded = upload(path)
    escape = os.path.join(os.path.dirname(uploaded["path"]), "..", "..", *Path(path).parts[1:])  # ../ out of the cache
    forged = [str(path), "/etc/passwd", "/no/such/file.png", escape, os.path.dirname(uploaded["path"]),
              uploaded["path"] + ".missing"]
    link = Path(uploaded["path"]).with_name("link.png")
    link.symlink_to(path)  # inside the cache, pointing out of it
    forged.append(str(link))
    messages = set()
    for forged_path in forged:
        with pytest.raises(gr.Error) as caught:
            detect({"path": forged_path, "orig_name": "x.png", "meta": {"_type": "gradio.FileData"}}, "bottle", "baseline", 0.5)
        messages.add(caught.value.message)
        with pytest.raises(gr.Error) as caught:
            detect(uploaded, "bottle", "baseline", 0.5, [uploaded, {"path": forged_path, "meta": {"_type": "gradio.FileData"}}])
        messages.add(caught.value.message)
    assert messages == {uploads.NOT_UPLOADED}  # one message for a path that exists and one that does not
    with pytest.raises(gr.Error, match="was not uploaded"):
        detect(str(path), "bottle", "baseline", 0.5)  # a bare path string is no upload either
    assert uploads.received_file(uploaded) == uploads.Upload(path.name, uploaded["path"])


def test_page_has_the_public_endpoints_with_their_inputs_and_every_method(detector):
    demo = layout.build_demo(detector)
    functions = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    assert {"detect", "full_resolution", "detect_batch"} <= set(functions)
    inputs = [type(block).__name__ for block in functions["detect"].inputs]
    assert inputs == ["Image", "Textbox", "Radio", "Slider", "File", "Checkbox", "Radio", "Radio"]  # new inputs only at the end
    assert functions["detect"].inputs[-2].value == handlers.CALIBRATED
    assert functions["detect"].inputs[-1].value == handlers.LOWEST_RATE  # the false-alarm rate: the default rule unless chosen
    batch_inputs = functions["detect_batch"].inputs
    assert [type(block).__name__ for block in batch_inputs] == ["File", "Textbox", "Radio", "Slider", "Checkbox", "Radio"]
    assert batch_inputs[-2].value is False and batch_inputs[-1].value == handlers.CALIBRATED  # mutual scoring: off unless asked for
    assert [value for _, value in functions["detect_batch"].inputs[2].choices] == detector.method_names  # no compare in batches
    assert not functions["detect"].preprocess and not functions["detect_batch"].preprocess  # uploads go through received_file
    methods = [value for _, value in render.method_choices(detector)]
    assert methods == detector.method_names + [COMPARE]
    notice = render.banner(detector)
    assert "Tiny random CLIP" in notice
    untrained = [display_name(m) for m in detector.method_names if detector.status(m) == "untrained"]
    assert all(name in notice for name in untrained) and ("untrained" in notice) == bool(untrained)


def readme_api_table() -> dict[str, tuple[list[str], list[str]]]:
    """The README's API table: each endpoint's parameter names and output labels (the `quoted` names of its cells)."""
    rows = [line.strip().strip("|").split("|") for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `/")]
    return {re.findall(r"`([^`]*)`", endpoint)[0]: (re.findall(r"`([^`]*)`", inputs), re.findall(r"`([^`]*)`", outputs))
            for endpoint, inputs, outputs in rows}


def test_every_output_is_named_and_the_readmes_api_table_is_what_view_api_reports(detector):
    """``get_api_info`` is what gradio_client's ``view_api`` prints: parameters by name, outputs by label (an output
    without a label would read ``value_N``)."""
    endpoints = layout.build_demo(detector).get_api_info()["named_endpoints"]
    served = {name: ([parameter["parameter_name"] for parameter in endpoint["parameters"]],
                     [output["label"] for output in endpoint["returns"]]) for name, endpoint in endpoints.items()}
    assert not [label for _, labels in served.values() for label in labels if re.fullmatch(r"value_\d+", label or "")]
    assert readme_api_table() == served


def test_examples_exist_and_are_readable():
    rows = layout.example_rows()
    assert rows, "examples/examples.json lists the shipped example images"
    for path, class_name in rows:
        image = zsad.runtime.images.load_image(path)
        assert min(image.size) >= 16 and class_name.strip()


def test_examples_are_what_the_synthetic_generator_makes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_examples", REPO / "examples" / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    rows = make_examples.make_examples(tmp_path)
    assert [[str(config.EXAMPLES_DIR / row["image"]), row["class_name"]] for row in rows] == layout.example_rows()
    for row in rows:
        regenerated, shipped = Image.open(tmp_path / row["image"]), Image.open(config.EXAMPLES_DIR / row["image"])
        np.testing.assert_array_equal(np.asarray(regenerated), np.asarray(shipped))


def test_checkpoints_come_from_environment_and_flags():
    environ = {config.checkpoint_variable(method): f"env/{method}" for method in zsad.METHODS}
    flagged = config.configured_checkpoints(["baseline=/local/ckpt"], environ)
    assert flagged["baseline"] == "/local/ckpt"
    assert all(flagged[method] == f"env/{method}" for method in zsad.METHODS if method != "baseline")
    assert config.configured_checkpoints([], {}) == {}
    with pytest.raises(ZSADError, match="METHOD=PATH"):
        config.configured_checkpoints(["stackclip"], {})


def run_app(*arguments, timeout=60):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "app.py", *arguments], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_help_works_without_loading_anything():
    result = run_app("--help")
    assert result.returncode == 0 and "--tiny" in result.stdout and "GRADIO_SERVER_PORT" in result.stdout
    assert "--batch-max-megapixels" in result.stdout


@pytest.mark.integration
def test_missing_backbone_exits_with_a_short_hint(tmp_path):
    result = run_app("--clip", str(tmp_path / "no-clip-here"))
    assert result.returncode != 0
    assert "--clip PATH" in result.stderr and "--tiny" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 4


def test_each_request_gets_a_folder_of_its_own_removed_only_after_it_is_done(detect, good_files):
    """Gradio rewrites a returned PIL image's cache file in place on every identical request (a client still
    downloading it gets a truncated file); files are written per request instead, and stay until their request has
    been done for the folders' linger time."""
    path, size = good_files["rgb"]
    folders = files.OutputFolders(linger=3600)
    serve = files.serving_files(detect, folders)
    outputs = [serve(upload(path), "bottle", COMPARE, 0.5) for _ in range(3)]
    (original, overlay), mask, score, _, _, views, *_ = outputs[-1]
    served = [original, overlay, mask, *(image for image, _ in views)]
    assert all(isinstance(file, str) and Path(file).is_file() for file in served)
    assert len(set(served)) == len(served)  # one file per image
    assert [Image.open(file).size for file in served] == [size] * len(served)
    reference_mask = detect(upload(path), "bottle", COMPARE, 0.5).mask
    np.testing.assert_array_equal(np.asarray(Image.open(mask)), np.asarray(reference_mask))  # PNG: exact
    assert all(Path(output[1]).is_file() for output in outputs)  # no request removed another's folder
    assert score == outputs[0][2]

    expiring = files.OutputFolders(linger=0)
    busy, finished = expiring.new_folder(), expiring.new_folder()
    expiring.done(finished)
    expiring.new_folder()
    assert busy.is_dir() and not finished.exists()  # a folder still in use is never removed


# ----- full-resolution downloads -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from zsad.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("product"), categories=["disk", "wood"], num_good=1, num_defective=1, image_size=64,
                    num_train_good=3)


def good_parts(root: Path, category: str = "disk") -> list[dict]:
    return [upload(path) for path in sorted((root / category / "train" / "good").glob("*.png"))]


def test_full_resolution_mask_uses_the_detections_pixel_threshold(detector, product, tmp_path):
    """With a calibrated profile the pixel threshold differs from the image threshold; the downloaded mask is the
    full-resolution map at the pixel threshold, as the mask on the page is."""
    image_path = next((product / "disk" / "test").rglob("*.png"))
    large = tmp_path / "large.png"
    Image.open(image_path).resize((1500, 1200)).save(large)
    profile = handlers.ReferenceProfiles(detector).get(good_parts(product), "disk", "baseline").profiles["baseline"]
    calibration = profile.calibration
    assert abs(calibration.pixel_threshold - calibration.image_threshold) > 0.01
    output = handlers.make_handler(detector)(upload(large), "disk", "baseline", 0.5, good_parts(product))
    expected = detector.detect(zsad.runtime.images.read_image(str(large), max_side=DISPLAY_SIDE), "disk", method="baseline",
                               profile=profile, display_side=DISPLAY_SIDE)
    assert expected.mask_threshold == calibration.pixel_threshold
    full_map, full_mask = (np.asarray(download.image) for download in output.full_resolution.downloads())
    reference = expected.full_resolution_map()
    assert full_mask.shape == (1200, 1500)
    np.testing.assert_array_equal(full_mask > 0, reference >= calibration.pixel_threshold)
    np.testing.assert_array_equal(full_map, np.round(reference * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(output.mask) > 0, expected.anomaly_map >= calibration.pixel_threshold)
    with pytest.raises(gr.Error, match="Run a detection first"):
        files.full_resolution_files(None)


def test_a_session_keeps_a_bounded_map_for_its_full_resolution_files(detector):
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (1500, 2600, 3), dtype=np.uint8))
    tiled = detector.detect_tiled(picture, "bottle", method="baseline")
    kept = files.FullResolution.of(tiled, "wide")
    assert max(kept.kept_map.shape) == files.KEPT_MAP_SIDE and kept.original_size == (2600, 1500)
    full_map, full_mask = (np.asarray(download.image) for download in kept.downloads())
    assert full_map.shape == full_mask.shape == (1500, 2600)
    assert np.abs(full_map.astype(int) - np.round(tiled.anomaly_map * 255)).mean() < 2.0  # resampled from the kept map


# ----- the batch tab --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Three image files of different sizes, and a zip with two more images in a folder, a text file, a macOS
    resource-fork copy and an image file that does not decode."""
    folder = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(1)
    arrays = {f"part{i}.png": rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(5)}
    paths = []
    for name in list(arrays)[:3]:
        Image.fromarray(arrays[name]).save(folder / name)
        paths.append(folder / name)
    archive = folder / "more.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in list(arrays)[3:]:
            zipped.writestr(f"line2/{name}", png(arrays[name]))
        zipped.writestr("line2/notes.txt", "not an image")
        zipped.writestr("__MACOSX/line2/._part3.png", b"resource fork")
        zipped.writestr("line2/broken.png", b"not a png at all")
    return paths + [archive], arrays


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


FOLDERS = files.OutputFolders()  # the app's folders live as long as the app


def run_batch(detector, paths, caps=BatchCaps(), class_name="metal nut", method="stackclip", threshold_mode=handlers.SLIDER):
    return handlers.make_batch_handler(detector, FOLDERS, caps)([upload(path) for path in paths], class_name, method, 0.5,
                                                                False, threshold_mode)


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_batch_of_files_and_a_zip_gives_table_csv_masks_and_gallery(detector, parts):
    paths, arrays = parts
    output = run_batch(detector, paths)
    names = ["part0.png", "part1.png", "part2.png", "line2/part3.png", "line2/part4.png", "line2/broken.png"]
    assert [row[0] for row in output.table] == names
    records = read_csv(output.csv_path)
    assert [record["file"] for record in records] == names
    for record, name in zip(records[:5], names):
        expected = detector.detect(arrays[Path(name).name], "metal nut", method="stackclip", threshold=0.5)
        assert float(record["score"]) == pytest.approx(expected.score, abs=1e-6)
        assert record["verdict"] == expected.verdict and record["error"] == ""
        assert float(record["anomalous_pixel_percent"]) == pytest.approx(100 * expected.mask.mean(), abs=0.01)
    assert records[5]["verdict"] == "unreadable"
    assert records[5]["error"] == "Not a readable image 'line2/broken.png'; use a PNG, JPEG, BMP or TIFF file."
    assert records[5]["score"] == "" and records[5]["mask"] == ""
    assert output.table[5][1] is None and output.table[0][1] == round(float(records[0]["score"]), 4)

    mask_names = [f"part{i}_mask.png" for i in range(5)]
    assert [row[4] for row in output.table[:5]] == [record["mask"] for record in records[:5]] == mask_names
    with zipfile.ZipFile(output.masks_path) as masks:
        assert masks.namelist() == mask_names
        mask = Image.open(io.BytesIO(masks.read("part4_mask.png")))
        assert mask.mode == "L" and mask.size == (56, 72)  # the image's own size
    assert len(output.gallery) == 5 and output.gallery[3][1].startswith("line2/part3.png: ")
    assert all(max(Image.open(path).size) <= files.THUMBNAIL_SIDE for path, _ in output.gallery)
    anomalous = sum(record["verdict"] == "anomalous" for record in records)
    assert f"{anomalous} of 5 images anomalous" in output.summary
    assert render.escaped("line2/broken.png") + ": unreadable: Not a readable image" in output.summary


def test_a_mutual_batch_scores_the_readable_images_against_each_other(detector, parts):
    paths, arrays = parts
    output = handlers.make_batch_handler(detector, FOLDERS)([upload(path) for path in paths], "", "baseline", 0.5, True)
    records = read_csv(output.csv_path)
    expected = detector.detect_mutual([arrays[f"part{i}.png"] for i in range(5)], "object", threshold=0.5)
    assert [float(record["score"]) for record in records[:5]] == pytest.approx([r.score for r in expected], abs=1e-6)
    assert [record["verdict"] for record in records] == [r.verdict for r in expected] + ["unreadable"]
    assert "each image was compared with 4 other images" in output.summary
    assert ("do not look like one product" in output.summary) == (expected[0].note is not None and "one product" in expected[0].note)
    with zipfile.ZipFile(output.masks_path) as masks:
        assert Image.open(io.BytesIO(masks.read("part4_mask.png"))).size == (56, 72)


def test_a_mutual_batch_needs_two_readable_images(detector, parts):
    paths, _ = parts
    with pytest.raises(gr.Error, match="needs at least two readable images of the product; 1 of 1 could be read"):
        handlers.make_batch_handler(detector, FOLDERS)([upload(paths[0])], "", "baseline", 0.5, True)
    with pytest.raises(gr.Error, match="class name is empty"):  # one by one, the text is what scores
        handlers.make_batch_handler(detector, FOLDERS)([upload(path) for path in paths[:2]], "", "baseline", 0.5, False)


def test_repeated_file_names_are_told_apart(detector, parts):
    paths, _ = parts
    table = run_batch(detector, paths[:1] * 2, method="baseline").table
    assert [row[0] for row in table] == ["part0.png", "part0 (2).png"]
    assert [row[4] for row in table] == ["part0_mask.png", "part0 (2)_mask.png"]
    assert table[0][1:4] == table[1][1:4]


def patched_zip(path: Path, members: dict[str, bytes], name: str, offset: int, value: bytes) -> Path:
    """A zip of ``members`` (deflated) with ``value`` written at ``offset`` of ``name``'s central directory entry."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for member, data in members.items():
            zipped.writestr(member, data)
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02" + b"".join([]), data.index(b"PK\x01\x02"))
    while data[entry + 46:entry + 46 + len(name)] != name.encode():
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + offset:entry + offset + len(value)] = value
    path.write_bytes(bytes(data))
    return path


def test_every_zip_member_that_cannot_be_read_is_its_own_rows_error(detector, parts, tmp_path):
    paths, arrays = parts
    good = png(arrays["part0.png"])
    flipped = tmp_path / "crc.zip"
    with zipfile.ZipFile(flipped, "w", compression=zipfile.ZIP_STORED) as zipped:
        zipped.writestr("good.png", good)
        zipped.writestr("bad-crc.png", good)
    data = bytearray(flipped.read_bytes())
    second = data.index(b"PK\x03\x04", 4)
    data[second + 30 + len("bad-crc.png") + 200] ^= 0xFF  # one byte of the second member's pixels
    flipped.write_bytes(bytes(data))
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as zipped:
        zipped.writestr("deep.png", good)
    members = {"good.png": good, "lying.png": good, "other.png": good, "locked.png": good, "notes.png": b"plain text",
               "inner.zip": inner.read_bytes()}
    lying = patched_zip(tmp_path / "lying.zip", members, "lying.png", 24, (100).to_bytes(4, "little"))  # uncompressed size
    locked = patched_zip(tmp_path / "locked.zip", members, "locked.png", 8, (1).to_bytes(2, "little"))  # encrypted flag
    method = patched_zip(tmp_path / "method.zip", members, "other.png", 10, (97).to_bytes(2, "little"))  # WavPack

    output = run_batch(detector, [flipped, lying, locked, method], method="baseline")
    errors = {row["file"]: (row["verdict"], row["error"]) for row in read_csv(output.csv_path)}
    assert errors["bad-crc.png"] == ("unreadable", "'bad-crc.png' is damaged in the zip (its data, checksum or size do not match); zip it again.")
    assert errors["lying.png"][0] == "unreadable" and "is damaged in the zip" in errors["lying.png"][1]
    assert errors["locked (2).png"][1].startswith("encrypted in the zip")  # the second zip's locked.png
    assert errors["other (3).png"][1].startswith("compressed with a method the Space cannot read")
    assert errors["notes.png"][1] == "Not a readable image 'notes.png'; use a PNG, JPEG, BMP or TIFF file."
    assert errors["inner.zip"] == ("skipped", "a zip inside a zip is not opened; add its images to the outer zip")
    scored = [name for name, (verdict, _) in errors.items() if verdict in ("normal", "anomalous")]
    assert len(scored) == 1 + 3 + 3 + 3  # every good member of every zip was scored
    assert all("BytesIO" not in error and "ZipInfo" not in error and str(tmp_path) not in error for _, error in errors.values())
    assert "inner.zip: skipped: a zip inside a zip" in output.summary.replace("\\", "")


def test_a_pixel_bomb_is_refused_from_the_headers_before_decoding(detector, tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for index in range(3):
            buffer = io.BytesIO()
            Image.new("L", (4000, 4000)).save(buffer, format="PNG")
            zipped.writestr(f"huge{index}.png", buffer.getvalue())
    assert bomb.stat().st_size < 200_000  # 48 megapixels in a small zip
    decoded = []
    monkeypatch.setattr(zsad.runtime.images, "load_image", lambda *args, **kwargs: decoded.append(args) or pytest.fail("decoded"))
    with pytest.raises(gr.Error, match=r"holds 48 megapixels of images; the Space takes at most 40 megapixels at a time\..*zsad predict"):
        run_batch(detector, [bomb], caps=BatchCaps(max_megapixels=40), method="baseline")
    output = run_batch(detector, [bomb], caps=BatchCaps(max_image_megapixels=10), method="baseline")
    assert {row[2] for row in output.table} == {"unreadable"} and decoded == []
    assert "is 4000x4000 pixels, more than the 10 megapixels the Space scores per batch image; run `zsad predict`" in read_csv(
        output.csv_path)[0]["error"]


def test_mask_entry_names_are_safe_base_names_unique_across_the_batch():
    names = ["../../etc/cron.d/x.png", "/abs/y.png", "C:\\Users\\z.png", "a\\b\\..\\w.png", "b.png", "b.jpg", "B.png", "..png",
             "sub/.hidden.png", "we<ird>|name.png"]
    masks = uploads.mask_names(names)
    assert masks == ["x_mask.png", "y_mask.png", "z_mask.png", "w_mask.png", "b_mask.png", "b (2)_mask.png", "B (3)_mask.png",
                     "png_mask.png", "hidden_mask.png", "we_ird__name_mask.png"]
    assert len({mask.lower() for mask in masks}) == len(masks)


def test_zip_member_names_are_safe_in_the_masks_zip_and_the_csv(detector, parts, tmp_path):
    _, arrays = parts
    archive = tmp_path / "hostile.zip"
    names = ["../../evil.png", "=HYPERLINK(\"x\").png", "@SUM(A1).png", "dir/b.png", "dir/b.jpg"]
    with zipfile.ZipFile(archive, "w") as zipped:
        for index, name in enumerate(names):
            zipped.writestr(name, png(arrays[f"part{index}.png"]))
    output = run_batch(detector, [archive], method="baseline")
    with zipfile.ZipFile(output.masks_path) as masks:
        entries = masks.namelist()
    assert entries == ["evil_mask.png", "_HYPERLINK(_x_)_mask.png", "_SUM(A1)_mask.png", "b_mask.png", "b (2)_mask.png"]
    assert [row[4] for row in output.table] == entries  # the table states the name used
    with open(output.csv_path, newline="", encoding="utf-8") as handle:
        cells = [row for row in csv.reader(handle)][1:]
    assert [row[0] for row in cells] == ["../../evil.png", "'=HYPERLINK(\"x\").png", "'@SUM(A1).png", "dir/b.png", "dir/b.jpg"]
    assert [files.spreadsheet_safe(cell) for cell in ["+1", "-2", "\tx", "\rx", "a=b", 0.25]] == ["'+1", "'-2", "'\tx", "'\rx", "a=b", 0.25]


@pytest.mark.parametrize(
    ("caps", "uploads_kind", "class_name", "message"),
    [
        (BatchCaps(max_images=4), "all", "screw", r"holds 6 images; the Space takes at most 4 at a time\. Split it"),
        (BatchCaps(max_megabytes=0.001), "all", "screw", r"MB of images \(zips counted uncompressed\).*at most 0\.001 MB"),
        (BatchCaps(), "none", "screw", "holds no images"),
        (BatchCaps(), "text zip", "screw", "holds no images"),
        (BatchCaps(), "bad zip", "screw", "bad.zip is not a readable zip archive"),
        (BatchCaps(), "all", " ", "class name is empty"),
    ],
)
def test_batch_caps_and_errors_are_clear_messages(detector, parts, tmp_path, caps, uploads_kind, class_name, message):
    text_zip, bad_zip = tmp_path / "texts.zip", tmp_path / "bad.zip"
    with zipfile.ZipFile(text_zip, "w") as zipped:
        zipped.writestr("readme.txt", "no images here")
    bad_zip.write_bytes(b"PK but not really")
    choices = {"all": parts[0], "none": [], "text zip": [text_zip], "bad zip": [bad_zip]}
    with pytest.raises(gr.Error, match=message):
        run_batch(detector, choices[uploads_kind], caps=caps, class_name=class_name, method="baseline")


def test_a_forged_batch_path_refuses_the_batch(detector, parts):
    with pytest.raises(gr.Error, match="was not uploaded"):
        handlers.make_batch_handler(detector, FOLDERS)([{"path": str(parts[0][0])}], "screw", "baseline", 0.5)


def test_page_puts_batches_in_their_own_concurrency_group(detector):
    demo = layout.build_demo(detector)
    functions = {fn.api_name: fn for fn in demo.fns.values()}
    assert functions["detect_batch"].concurrency_id == layout.BATCH_CONCURRENCY_ID != functions["detect"].concurrency_id


def test_a_waiting_single_request_goes_before_the_next_batch_chunk():
    turns, order = scheduling.ComputeTurns(), []
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
    while turns.singles_waiting == 0 and time.monotonic() < deadline:  # the single request is waiting for its turn
        time.sleep(0.01)
    finish_chunk.set()
    batch_thread.join(10)
    single_thread.join(10)
    assert order == ["chunk 1", "single", "chunk 2"]


# ----- reference images ----------------------------------------------------------------------------


def test_the_threshold_mode_decides_and_the_same_call_gives_the_same_answer(detector, product):
    profiles = handlers.ReferenceProfiles(detector)
    detect = handlers.make_handler(detector, profiles)
    image = upload(next((product / "disk" / "test").rglob("*.png")))
    first = detect(image, "disk", "baseline", 0.5, good_parts(product))
    calibration = profiles.get(good_parts(product), "disk", "baseline").profiles["baseline"].calibration
    assert "3 reference images of good parts; calibrated on 3 good images: at most 1 in 4 good parts flagged; image threshold" in first.report
    assert f"(threshold {calibration.image_threshold:.2f})" in first.report
    again = detect(image, "disk", "baseline", 0.5, good_parts(product))
    assert again.report.split("request took")[0] == first.report.split("request took")[0] and again.table[0][:5] == first.table[0][:5]
    assert profiles.builds == 1  # the profile of a set of references is built once
    by_hand = detect(image, "disk", "baseline", 0.3, good_parts(product), False, handlers.SLIDER)
    assert "threshold 0.3 set by hand" in by_hand.report and "(threshold 0.30)" in by_hand.report
    without = detect(image, "disk", "baseline", 0.3, None, False, handlers.SLIDER)
    assert "uncalibrated (threshold 0.3 set by hand)" in without.report  # no profile: the slider decides in its mode
    with pytest.raises(gr.Error, match="threshold mode must be one of calibrated, slider"):
        detect(image, "disk", "baseline", 0.5, None, False, "auto")
    detect(image, "disk", COMPARE, 0.5, good_parts(product))
    assert profiles.builds == 2  # compare mode: one profile per method, built together


def test_duplicated_references_are_reported_and_calibration_uses_distinct_images(detector, product):
    profiles = handlers.ReferenceProfiles(detector)
    parts = good_parts(product)
    doubled = parts + [upload(Path(parts[0]["path"]), "copy of first.png"), upload(Path(parts[1]["path"]), "again.png")]
    reference_set = profiles.get(doubled, "disk", "baseline")
    assert reference_set.duplicates == ["copy of first.png", "again.png"]
    distinct = profiles.get(parts, "disk", "baseline")
    assert profiles.builds == 1 and reference_set.profiles is distinct.profiles  # the same distinct set: the same profile
    assert reference_set.profiles["baseline"].num_references == 3
    report = handlers.make_handler(detector, profiles)(upload(Path(parts[0]["path"])), "disk", "baseline", 0.5, doubled).report
    assert "2 reference images left out: the same content as another reference (copy of first\\.png, again\\.png)" in report
    assert "calibrated on 3 good images" in report


def test_references_are_decoded_one_at_a_time_at_the_reference_side_within_a_pixel_budget(detector, product, tmp_path, monkeypatch):
    large = []
    for index in range(2):
        path = tmp_path / f"large{index}.png"
        Image.open(sorted((product / "disk" / "train" / "good").glob("*.png"))[index]).resize((3000, 2000)).save(path)
        large.append(upload(path))
    sizes = []
    build = detector.build_profiles
    monkeypatch.setattr(detector, "build_profiles", lambda methods, name, pictures, **options: sizes.extend(p.size for p in pictures) or build(
        methods, name, pictures, **options))
    handlers.ReferenceProfiles(detector).get(large, "disk", "baseline")
    assert sizes == [(REFERENCE_SIDE, 596)] * 2  # 3000x2000 bounded to 894 px: 894 x 596
    with pytest.raises(ZSADError, match=r"hold 12 megapixels; the Space takes at most 10 megapixels per set.*zsad predict --profile"):
        handlers.ReferenceProfiles(detector, caps=ReferenceCaps(max_megapixels=10)).get(large, "disk", "baseline")


def test_bad_references_are_clear_messages_and_the_app_keeps_serving(detector, product, bad_files):
    detect = handlers.make_handler(detector)
    image = upload(next((product / "disk" / "test").rglob("*.png")))
    with pytest.raises(gr.Error, match="Reference image 2: Not a readable image 'notes.png'") as caught:
        detect(image, "disk", "baseline", 0.5, [good_parts(product)[0], upload(bad_files["unreadable"])])
    assert "BytesIO" not in str(caught.value) and "/" not in str(caught.value)
    with pytest.raises(gr.Error, match=f"200 reference images were given; at most {config.MAX_REFERENCES} are used"):
        detect(image, "disk", "baseline", 0.5, good_parts(product)[:1] * 200)
    assert "No reference images (zero-shot)" in detect(image, "disk", "baseline", 0.5, []).report
    one = detect(image, "disk", "baseline", 0.5, good_parts(product)[:1]).report
    assert "1 reference image of good parts; uncalibrated (threshold 0.5) (calibration needs at least two distinct" in one
    assert render.NO_VERDICT_ADVICE in one  # one reference calibrates nothing: no verdict for the training-free baseline
    other_product = detect(upload(next((product / "wood" / "test").rglob("*.png"))), "disk", "baseline", 0.5, good_parts(product)).report
    assert "does not look like the reference images" in other_product


def test_a_product_name_is_shown_as_typed_never_as_html(detector, good_files):
    from markdown_it import MarkdownIt

    path, _ = good_files["rgb"]
    typed = "<img src=x onerror=alert(1)> *bold* [link](http://x)"
    report = handlers.make_handler(detector)(upload(path), typed, "genclip", 0.5).report
    rendered = MarkdownIt("commonmark").render(report)
    assert "<img" not in rendered and "<em>" not in rendered and "<a " not in rendered
    assert "&lt;img src=x onerror=alert(1)&gt; *bold* [link](http://x)" in rendered  # the visitor's text, as text
    assert render.TABLE_TYPES.count("markdown") == render.TABLE_TYPES.count("html") == 0


def test_example_names_warm_in_the_background_taking_turns_with_requests(fresh_backbone, monkeypatch):
    detector = AnomalyDetector.load(methods=["baseline"], clip=fresh_backbone, image_size=TEST_IMAGE_SIZE)
    turns = scheduling.ComputeTurns()
    with turns.single():  # a request in progress: the warm-up waits for it
        thread = scheduling.warm_example_names(detector, ["metal_nut", "capsule", "metal nut"], turns)
        thread.join(timeout=0.5)
        assert thread.is_alive() and len(fresh_backbone._frozen_features) == 0
    thread.join(timeout=60)
    assert not thread.is_alive() and len(fresh_backbone._frozen_features) == 2  # "metal_nut" is "metal nut"
    warmed = prompt_ensemble_features(fresh_backbone, ["capsule", "metal nut"])
    monkeypatch.setattr(fresh_backbone, "encode_prompts", lambda *args: pytest.fail("a warmed name was encoded again"))
    torch.testing.assert_close(detector.model("baseline").class_text_features(["metal nut", "capsule"]), warmed.flip(0))


def test_the_raw_api_takes_only_json_booleans_for_switches(detect, detector, good_files):
    with pytest.raises(gr.Error, match="'tiles' must be true or false .a JSON boolean., got 'false'"):
        detect(upload(good_files["rgb"][0]), "bottle", "baseline", 0.5, None, "false")
    batch = handlers.make_batch_handler(detector, FOLDERS)
    with pytest.raises(gr.Error, match="'mutual' must be true or false .a JSON boolean., got 'false'"):
        batch([upload(good_files["rgb"][0])], "bottle", "baseline", 0.5, "false")
    with pytest.raises(gr.Error, match="'method' must be one method name"):
        batch([upload(good_files["rgb"][0])], "bottle", ["baseline"], 0.5)


# ----- verdicts only where a threshold means something --------------------------------------------


def test_an_untrained_method_without_calibration_gets_no_verdict_unless_the_slider_is_chosen(detect, detector, good_files):
    """The CLI's rule (``gives_verdict``): in "calibrated" mode without references a training-free method gives score,
    map and rank, no verdict, and its mask is at the default threshold as the CLI writes it; "slider" sets the threshold."""
    path, _ = good_files["rgb"]
    expected = detector.detect(str(path), "bottle", method="baseline", display_side=DISPLAY_SIDE)
    unscaled = detect(upload(path), "bottle", "baseline", 0.2)
    assert unscaled.score == round(expected.score, 4) and unscaled.table[0][3] == "none"
    assert unscaled.report.splitlines()[0] == f"### CLIP baseline (training-free): **none**, score {expected.score:.3f}"  # no threshold
    assert render.NO_VERDICT_ADVICE in unscaled.report
    assert "“slider” under “Threshold used”" in render.NO_VERDICT_ADVICE and "reference images of good parts" in render.NO_VERDICT_ADVICE
    np.testing.assert_array_equal(np.asarray(unscaled.mask) > 0, expected.anomaly_map >= 0.5)  # not the slider's 0.2
    by_hand = detect(upload(path), "bottle", "baseline", 0.2, None, False, handlers.SLIDER)
    reached = "anomalous" if expected.score >= 0.2 else "normal"
    assert by_hand.table[0][3] == reached and f"**{reached}**" in by_hand.report and "(threshold 0.20)" in by_hand.report
    assert "uncalibrated (threshold 0.2 set by hand)" in by_hand.report and render.NO_VERDICT_ADVICE not in by_hand.report
    np.testing.assert_array_equal(np.asarray(by_hand.mask) > 0, expected.anomaly_map >= 0.2)


@pytest.fixture(scope="module")
def mixed_detector(tiny_backbone):
    """A trained StackCLIP (its config says so) beside the training-free baseline."""
    trained = load_model("stackclip", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE)
    trained.config.is_trained = True
    return AnomalyDetector(tiny_backbone, {"stackclip": trained, "baseline": load_model("baseline", backbone=tiny_backbone,
                                                                                        image_size=TEST_IMAGE_SIZE)})


def test_a_trained_method_without_calibration_decides_at_the_slider_and_compare_decides_per_method(mixed_detector, good_files):
    path, _ = good_files["rgb"]
    detect = handlers.make_handler(mixed_detector)
    expected = mixed_detector.detect(str(path), "bottle", method="stackclip", threshold=0.3, display_side=DISPLAY_SIDE)
    trained = detect(upload(path), "bottle", "stackclip", 0.3)
    assert trained.table[0][3] == expected.verdict != "none" and "uncalibrated (threshold 0.3 set by hand)" in trained.report
    compared = detect(upload(path), "bottle", COMPARE, 0.3)
    assert [row[3] for row in compared.table] == [expected.verdict, "none"]  # the baseline's 0.3 means nothing
    assert [caption for _, caption in compared.gallery[::2]] == [f"StackCLIP: {compared.table[0][2]:.3f} {expected.verdict}",
                                                                 f"CLIP baseline: {compared.table[1][2]:.3f}"]
    assert compared.report.count(render.NO_VERDICT_ADVICE) == 1


def test_a_batch_gives_verdicts_only_where_a_threshold_means_something(detector, parts):
    paths, arrays = parts
    unscaled = run_batch(detector, paths[:3], method="baseline", threshold_mode=handlers.CALIBRATED)
    expected = [detector.detect(arrays[f"part{i}.png"], "metal nut", method="baseline") for i in range(3)]
    assert [row[1:3] for row in unscaled.table] == [[round(result.score, 4), "none"] for result in expected]
    assert [record["verdict"] for record in read_csv(unscaled.csv_path)] == ["none"] * 3
    assert "### 3 images scored: no verdict" in unscaled.summary and render.BATCH_NO_VERDICT_ADVICE in unscaled.summary
    assert [caption for _, caption in unscaled.gallery] == [f"part{i}.png: {result.score:.3f}" for i, result in enumerate(expected)]
    with zipfile.ZipFile(unscaled.masks_path) as masks:  # the masks at the default threshold, as the CLI writes them
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(masks.read("part0_mask.png")))) > 0, expected[0].mask)
    by_hand = run_batch(detector, paths[:3], method="baseline", threshold_mode=handlers.SLIDER)
    assert [row[2] for row in by_hand.table] == [result.verdict_line.split()[0] for result in
                                                 (detector.detect(arrays[f"part{i}.png"], "metal nut", method="baseline",
                                                                  threshold=0.5) for i in range(3))]
    assert "of 3 images anomalous at threshold 0.50" in by_hand.summary
    mutual = handlers.make_batch_handler(detector, FOLDERS)([upload(path) for path in paths[:3]], "", "baseline", 0.5, True)
    assert {row[2] for row in mutual.table} <= {"normal", "anomalous"}  # on the group's own scale: a verdict
    with pytest.raises(gr.Error, match="threshold mode must be one of calibrated, slider"):
        run_batch(detector, paths[:1], method="baseline", threshold_mode="auto")
