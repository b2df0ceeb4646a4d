"""AnomalyDetector: maps at the original size, masks, verdicts, batches, checkpoints and every bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import zsad
from zsad import AnomalyDetector, ZSADError
from zsad.runtime.errors import BackboneLoadError
from zsad.runtime.images import to_pixel_values
from zsad.runtime.loading import checkpoint_backbone, checkpoint_method, load_model

from conftest import TEST_IMAGE_SIZE
from image_files import HEIGHT, WIDTH, random_rgb


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector.load(clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


def test_detector_holds_every_registered_method_on_one_backbone(detector, tiny_backbone):
    assert detector.method_names == list(zsad.METHODS)
    assert all(model.clip is tiny_backbone for model in detector.models.values())
    assert detector.status("baseline") == "training-free"
    for method in set(zsad.METHODS) - {"baseline"}:
        assert detector.status(method) == "untrained"


@pytest.mark.parametrize("kind", ["rgb", "gray16", "cmyk", "rgba", "gray", "exif_rotated"])
def test_map_mask_and_overlay_come_back_at_the_upright_image_size(detector, good_files, kind):
    path, (width, height) = good_files[kind]
    result = detector.detect(path, "bottle", method="baseline", threshold=0.5)
    assert result.anomaly_map.shape == (height, width) and result.anomaly_map.dtype == np.float32
    assert 0.0 <= result.anomaly_map.min() <= result.anomaly_map.max() <= 1.0
    np.testing.assert_array_equal(result.mask, result.anomaly_map >= 0.5)
    assert result.overlay.size == (width, height) and result.overlay.mode == "RGB"
    assert 0.0 <= result.score <= 1.0 and result.seconds > 0


def test_map_is_the_bilinear_resize_of_the_model_map_and_score_is_the_models(detector, tiny_backbone):
    image = Image.fromarray(random_rgb(3, width=150, height=130))  # both sides upsampled from 112
    model = detector.model("baseline")
    pixel_values = to_pixel_values([image], TEST_IMAGE_SIZE, tiny_backbone.image_mean, tiny_backbone.image_std)
    with torch.no_grad():
        output = model(pixel_values, class_names=["bottle"])
    # Reference resize by Pillow (independent of torch's interpolate); both are half-pixel bilinear.
    expected = np.asarray(Image.fromarray(output.anomaly_map[0].numpy(), mode="F").resize((150, 130), Image.Resampling.BILINEAR))
    result = detector.detect(image, "bottle", method="baseline")
    np.testing.assert_allclose(result.anomaly_map, expected, atol=1e-5)
    assert result.score == pytest.approx(float(output.image_score[0]), abs=1e-6)


def test_verdict_and_mask_follow_the_threshold(detector):
    image = random_rgb(4)
    score = detector.detect(image, "bottle", method="baseline").score
    at_score = detector.detect(image, "bottle", method="baseline", threshold=score)
    above = detector.detect(image, "bottle", method="baseline", threshold=min(score + 1e-3, 1.0))
    assert (at_score.verdict, above.verdict) == ("anomalous", "normal")
    assert detector.detect(image, "bottle", method="baseline", threshold=0.0).mask.all()
    full = detector.detect(image, "bottle", method="baseline", threshold=1.0)
    np.testing.assert_array_equal(full.mask, full.anomaly_map >= 1.0)
    assert full.mask_image().mode == "L" and set(np.unique(np.asarray(full.mask_image()))) <= {0, 255}


def test_a_batch_gives_the_same_results_as_one_image_at_a_time(detector):
    images = [random_rgb(5, 80, 60), random_rgb(6, 40, 120)]
    batch = detector.detect_batch(images, ["bottle", "metal_nut"], method="baseline")
    for image, name, result in zip(images, ["bottle", "metal_nut"], batch):
        single = detector.detect(image, name, method="baseline")
        assert result.class_name == single.class_name == name.replace("_", " ")
        assert result.score == pytest.approx(single.score, abs=1e-5)
        np.testing.assert_allclose(result.anomaly_map, single.anomaly_map, atol=1e-5)


def test_compare_runs_every_method_on_the_same_image(detector):
    results = detector.compare(random_rgb(7), "bottle")
    assert list(results) == detector.method_names
    assert all(result.method == name and result.anomaly_map.shape == (HEIGHT, WIDTH) for name, result in results.items())


@pytest.mark.parametrize("threshold, kept", [(0.0, True), (1.01, False)])  # every probability reaches 0.0, none 1.01
def test_genclip_details_carry_the_class_name_filter_decision_for_that_image(tiny_backbone, threshold, kept):
    model = load_model("genclip", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE, cnf_threshold=threshold, cnf_top_k=0)
    result = AnomalyDetector(tiny_backbone, {"genclip": model}).detect(random_rgb(8), "bottle", method="genclip")
    choice = result.details.class_name
    assert (choice.mode, choice.name_given, choice.kept) == ("hard", "bottle", kept)
    assert (choice.name_used, choice.class_weight) == (("bottle", 1.0) if kept else ("object", 0.0))
    assert 0.0 < choice.probability < 1.0
    summary = result.summary()["details"]
    assert summary["class_name"]["name_given"] == "bottle" and "vision_map" not in summary  # maps are not details
    json.dumps(result.summary())


@pytest.mark.parametrize(
    "image, class_name, method, threshold, message",
    [
        (None, "bottle", "baseline", 0.5, "No image"),
        (random_rgb(), "", "baseline", 0.5, "class name is empty"),
        (random_rgb(), "   ", "baseline", 0.5, "class name is empty"),
        (random_rgb(), "x" * 500, "baseline", 0.5, "500 characters"),
        (random_rgb(), None, "baseline", 0.5, "must be a string"),
        (random_rgb(), "bottle", "nosuchmethod", 0.5, "Unknown method"),
        (random_rgb(), "bottle", "baseline", 1.5, "between 0 and 1"),
        (random_rgb(), "bottle", "baseline", "high", "between 0 and 1"),
        (np.zeros((8, 8, 3), np.uint8), "bottle", "baseline", 0.5, "at least 16 px"),
    ],
)
def test_user_errors_raise_zsaderror_with_a_clear_message(detector, image, class_name, method, threshold, message):
    with pytest.raises(ZSADError, match=message):
        detector.detect(image, class_name, method=method, threshold=threshold)


@pytest.mark.parametrize("kind, message", [("unreadable", "Not a readable image"), ("truncated", "truncated"), ("bomb", "more than")])
def test_bad_files_raise_zsaderror(detector, bad_files, kind, message):
    with pytest.raises(ZSADError, match=message):
        detector.detect(bad_files[kind], "bottle", method="baseline")


def test_batch_input_errors(detector):
    with pytest.raises(ZSADError, match="No images"):
        detector.detect_batch([], "bottle", method="baseline")
    with pytest.raises(ZSADError, match="2 class names for 1 images"):
        detector.detect_batch([random_rgb()], ["a", "b"], method="baseline")
    with pytest.raises(ZSADError, match="Say which method"):
        detector.detect(random_rgb(), "bottle")


def test_a_trained_checkpoint_is_loaded_on_the_shared_backbone(tmp_path, tiny_backbone, tiny_clip_path):
    model = zsad.load_model("baseline", backbone=tiny_backbone, clip=str(tiny_clip_path), image_size=56)
    model.config.is_trained = True
    model.save_pretrained(tmp_path / "baseline")
    assert checkpoint_backbone([str(tmp_path / "baseline")]) == (str(tiny_clip_path), None)
    assert checkpoint_method(str(tmp_path / "baseline")) == "baseline"
    detector = AnomalyDetector.load(methods=["baseline"], checkpoints={"baseline": str(tmp_path / "baseline")}, clip=tiny_backbone)
    loaded = detector.model("baseline")
    assert loaded.clip is tiny_backbone and loaded.config.image_size == 56
    assert detector.status("baseline") == "training-free"  # one status rule (zsad.runtime.methods.status): nothing to train
    assert detector.detect(random_rgb(), "bottle").anomaly_map.shape == (HEIGHT, WIDTH)  # single model: method optional
    # Without a CLIP given, the backbone is the one named in the checkpoint's config.
    alone = AnomalyDetector.for_model(str(tmp_path / "baseline"))
    assert alone.method_names == ["baseline"] and alone.backbone.model.config._name_or_path == str(tiny_clip_path)
    with pytest.raises(ZSADError, match="only for untrained"):
        AnomalyDetector.for_model(str(tmp_path / "baseline"), image_size=112)


def test_checkpoint_errors(tmp_path, tiny_backbone, tiny_clip_path):
    other = next((name for name in zsad.METHODS if name != "baseline"), None)
    if other is not None:
        zsad.load_model("baseline", backbone=tiny_backbone, clip=str(tiny_clip_path)).save_pretrained(tmp_path / "baseline")
        with pytest.raises(ZSADError, match="not a"):
            AnomalyDetector.load(methods=[other], checkpoints={other: str(tmp_path / "baseline")}, clip=tiny_backbone)
    with pytest.raises(ZSADError, match="unknown methods"):
        AnomalyDetector.load(checkpoints={"nosuch": str(tmp_path)}, clip=tiny_backbone)
    with pytest.raises(ZSADError, match="Could not read the config"):
        checkpoint_backbone([str(tmp_path / "missing")])
    with pytest.raises(BackboneLoadError, match="Could not load the CLIP backbone") as caught:
        AnomalyDetector.for_model("baseline", clip=str(tmp_path / "no-clip"))
    assert caught.value.clip == str(tmp_path / "no-clip")


def test_the_model_input_is_the_upright_bicubic_resized_normalised_image(detector, tiny_backbone, good_files):
    """Computed here independently for an EXIF-rotated JPEG: decoded pixels turned upright by hand, Pillow's bicubic
    resize to the model size (no crop), then the backbone's mean and std; compared with what the vision tower gets."""
    path, _ = good_files["exif_rotated"]
    upright = np.ascontiguousarray(np.rot90(np.asarray(Image.open(path).convert("RGB")), k=-1))  # EXIF 6: 90 deg clockwise
    resized = Image.fromarray(upright).resize((TEST_IMAGE_SIZE, TEST_IMAGE_SIZE), Image.Resampling.BICUBIC)
    normalised = (np.asarray(resized) / 255.0 - np.array(tiny_backbone.image_mean)) / np.array(tiny_backbone.image_std)
    expected = torch.from_numpy(normalised.transpose(2, 0, 1)[None].astype(np.float32))
    inputs = []
    patch_embedding = tiny_backbone.model.vision_model.embeddings.patch_embedding
    handle = patch_embedding.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    try:
        result = detector.detect(path, "bottle", method="baseline")
    finally:
        handle.remove()
    assert len(inputs) == 1
    torch.testing.assert_close(inputs[0].float(), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        reference = detector.model("baseline")(expected, class_names=["bottle"])
    assert result.score == pytest.approx(float(reference.image_score[0]), abs=1e-6)


def test_predict_command_writes_overlays_masks_and_scores(tmp_path, tiny_clip_path, detector, capsys):
    from zsad_cli import main

    for folder, seed, size in (("a", 10, (90, 60)), ("b", 11, (50, 70)), ("b/deeper", 12, (64, 64))):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(random_rgb(seed, *size)).save(tmp_path / folder / "part.png")
    missing = tmp_path / "missing.png"
    arguments = ["predict", "--model", "baseline", "--clip", str(tiny_clip_path), "--class-name", "bottle", "--image-size", str(TEST_IMAGE_SIZE),
                 "--precision", "float32"]  # as the reference detector below
    out = tmp_path / "out"
    code = main([*arguments, str(tmp_path / "a" / "part.png"), str(tmp_path / "b"), str(missing), "--out", str(out), "--batch-size", "2"])
    assert code == 2 and "1 of 4 images could not be read" in capsys.readouterr().err
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["method"], scores["status"], scores["class_name"]) == ("baseline", "training-free", "bottle")
    records = scores["images"]
    assert [record["image"] for record in records] == [
        str(tmp_path / "a" / "part.png"), str(tmp_path / "b" / "deeper" / "part.png"), str(tmp_path / "b" / "part.png"), str(missing)
    ]
    assert "not found" in records[3]["error"]
    assert [record["overlay"] for record in records[:3]] == ["part.png_overlay.png", "part.png (2)_overlay.png",
                                                               "part.png (3)_overlay.png"]
    for record in records[:3]:
        expected = detector.detect(record["image"], "bottle", method="baseline")  # same backbone and size
        original_size = Image.open(record["image"]).size
        assert Image.open(out / record["overlay"]).size == Image.open(out / record["mask"]).size == original_size
        assert record["score"] == pytest.approx(expected.score, abs=1e-5)
        assert record["verdict"] == expected.verdict
        mask = np.asarray(Image.open(out / record["mask"])) > 0
        assert record["anomalous_pixel_fraction"] == pytest.approx(mask.mean())
        assert abs(mask.mean() - expected.mask.mean()) < 0.01  # batched vs single: float noise at the threshold only


def test_predict_command_with_a_checkpoint_and_bad_arguments(tmp_path, tiny_backbone, tiny_clip_path, capsys):
    from zsad_cli import main

    zsad.load_model("baseline", backbone=tiny_backbone, clip=str(tiny_clip_path), image_size=56).save_pretrained(tmp_path / "ckpt")
    Image.fromarray(random_rgb(13)).save(tmp_path / "x.png")
    common = ["--class-name", "bottle", str(tmp_path / "x.png"), "--out", str(tmp_path / "out")]
    assert main(["predict", "--model", str(tmp_path / "ckpt"), *common]) == 0
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["images"][0]["score"] >= 0.0
    empty_name = ["--class-name", "", str(tmp_path / "x.png"), "--out", str(tmp_path / "o2")]
    assert main(["predict", "--model", "baseline", "--clip", str(tiny_clip_path), *empty_name]) == 2
    assert "class name is empty" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "nothing"), *common]) == 2
    assert "Could not read the config" in capsys.readouterr().err


def module_state(root: torch.nn.Module) -> dict[str, tuple]:
    """Per submodule: its instance attributes (a stored tensor or a replaced ``forward`` shows here) and its hooks."""
    return {name: (sorted(vars(module)), len(module._forward_hooks), len(module._forward_pre_hooks))
            for name, module in root.named_modules()}


def test_compare_runs_the_vision_tower_once_per_size_and_interpolation(monkeypatch, tiny_clip_path):
    detector = AnomalyDetector.load(clip=str(tiny_clip_path), image_size=112)
    passes = []
    original = detector.backbone._run_vision_tower
    monkeypatch.setattr(detector.backbone, "_run_vision_tower", lambda *a: passes.append(a[-1]) or original(*a))
    state_before = module_state(detector.backbone)
    image = Image.new("RGB", (80, 60), (120, 90, 30))
    results = detector.compare(image, "wood")
    # AnomalyCLIP resizes position embeddings bilinearly (its authors' way), every other method bicubically.
    assert sorted(passes) == ["bicubic", "bilinear"] and len(results) == len(detector.method_names) > 2
    assert module_state(detector.backbone) == state_before  # nothing of the request is left on the shared modules
    separate = {name: detector.detect(image, "wood", method=name) for name in detector.method_names}
    assert len(passes) == 2 + len(detector.method_names)
    for name, result in results.items():
        np.testing.assert_array_equal(result.anomaly_map, separate[name].anomaly_map)


def test_overlay_blends_the_colormap_half_and_half():
    from matplotlib import colormaps

    from zsad.detection.visualize import overlay_heatmap

    image = Image.fromarray(np.full((3, 4, 3), 200, dtype=np.uint8))
    anomaly_map = np.array([[0.0, 0.5, 1.0, 2.0]] * 3, dtype=np.float32)  # 2.0 is clipped to 1
    overlay = np.asarray(overlay_heatmap(image, anomaly_map))
    jet = colormaps["jet"]
    for column, value in enumerate([0.0, 0.5, 1.0, 1.0]):
        expected = 0.5 * 200 + 0.5 * np.asarray(jet(value)[:3]) * 255
        np.testing.assert_allclose(overlay[0, column], expected, atol=1.5)
    assert overlay.shape == (3, 4, 3) and overlay.dtype == np.uint8


def test_the_serving_path_leaves_scikit_learn_unimported():
    # scikit-learn costs the Space ~80 MB of RSS (benchmarks/bench_memory.py); only training and evaluation need it.
    code = "import sys, zsad.detection.detector; print('sklearn' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "False"


def test_compare_serves_different_value_value_starts_from_one_pass(monkeypatch, tiny_backbone):
    """baseline on K = 1 (the lineage default), stackclip on CLIP's own tokens, genclip on K = 3: one vision pass with
    three streams, each method's result as when it runs alone; a profile refuses a model with another K."""
    models = {"baseline": zsad.load_model("baseline", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE),
              "stackclip": zsad.load_model("stackclip", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE, vv_attention_from=None),
              "genclip": zsad.load_model("genclip", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE, vv_attention_from=3)}
    assert [model.config.vv_attention_from for model in models.values()] == [1, None, 3]
    detector = AnomalyDetector(tiny_backbone, models)
    stock = AnomalyDetector(tiny_backbone, {"baseline": zsad.load_model(
        "baseline", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE, vv_attention_from=None)})
    streams = []
    original = tiny_backbone._run_vision_tower
    monkeypatch.setattr(tiny_backbone, "_run_vision_tower",
                        lambda pixels, layers, *rest: streams.append(dict(layers)) or original(pixels, layers, *rest))
    image = Image.new("RGB", (80, 60), (120, 90, 30))
    image.putpixel((40, 30), (255, 255, 255))
    results = detector.compare(image, "wood")
    assert streams == [{1: [1, 2, 3, 4], None: [1, 2, 3, 4], 3: [1, 2, 3, 4]}]
    for name, result in results.items():
        alone = detector.detect(image, "wood", method=name)
        np.testing.assert_allclose(result.anomaly_map, alone.anomaly_map, rtol=0, atol=1e-6)
    assert not np.allclose(results["baseline"].model_map, stock.detect(image, "wood").model_map, atol=1e-4)
    goods = [Image.new("RGB", (80, 60), (120 + i, 90, 30)) for i in range(2)]
    profile = detector.build_profile("baseline", "wood", goods)
    assert profile.memory.vv_attention_from == 1
    with pytest.raises(ZSADError, match="vv_attention_from=1, the model uses None"):
        stock.detect(image, "wood", profile=profile)
