"""The transformers pipeline every checkpoint carries, run as Hub users run it: ``pipeline(model=...,
trust_remote_code=True)`` in a fresh process where zsad cannot be imported, on the folders ``zsad publish --dry-run``
writes; its results must equal zsad's own ``AnomalyDetector`` on the same images."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import zsad
from zsad import AnomalyDetector
from zsad.modeling.image_processing_zsad import verdict
from zsad.modeling.pipeline_zsad import TASK, ZeroShotAnomalyDetectionPipeline
from zsad.runtime.loading import Runtime
from zsad.runtime.provenance import text_precision, vision_precision
from zsad_cli import main

from conftest import tiny_model
from remote_code import WITHOUT_ZSAD

THRESHOLD = 0.3
CLASS_NAME = "metal nut"
# The files the pipeline needs next to the model code (pipeline_zsad.py imports the image processing).
PIPELINE_FILES = {"pipeline_zsad.py", "image_processing_zsad.py", "class_names.py", "exceptions.py", "mutual_scoring.py", "anomaly_maps.py",
                  "precision.py"}

SCRIPT = WITHOUT_ZSAD + textwrap.dedent(
    """
    import json
    import numpy as np
    from transformers import pipeline
    folders, images, threshold, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    arrays, facts = {}, {}
    for method, folder in folders.items():
        detector = pipeline(model=folder, trust_remote_code=True, precision="float32")  # as the detector it is compared with
        assert type(detector).__module__.startswith("transformers_modules"), type(detector).__module__
        single = detector(images[0], class_name="metal_nut")  # default threshold; the name is cleaned
        several = detector(images, class_name="metal nut", threshold=threshold)
        assert isinstance(single, dict) and isinstance(several, list) and len(several) == len(images)
        for key, result in [("single", single)] + [(f"list{i}", r) for i, r in enumerate(several)]:
            arrays[f"{method}.{key}.map"] = result["anomaly_map"]
            arrays[f"{method}.{key}.mask"] = np.asarray(result["mask"])
            facts[f"{method}.{key}"] = {name: result[name] for name in ("score", "verdict", "threshold", "class_name")}
            facts[f"{method}.{key}"]["mask_mode"] = result["mask"].mode
        together = detector(images, class_name="metal nut", mutual=True)  # scored against each other
        for i, result in enumerate(together):
            arrays[f"{method}.mutual{i}.map"] = result["anomaly_map"]
            facts[f"{method}.mutual{i}"] = {name: result[name] for name in ("score", "verdict", "compared_with")}
        facts[method + ".class"] = type(detector).__name__
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as handle:
        json.dump(facts, handle)
    """
)


@pytest.fixture(scope="module")
def models(tiny_backbone):
    """Each method on the tiny CLIP: the baseline, GenCLIP untrained, StackCLIP and AnomalyCLIP with changed
    ("trained") weights, so a pipeline that ignored the checkpoint's weights would not match."""
    made = {name: tiny_model(name, tiny_backbone) for name in ("baseline", "genclip", "stackclip", "anomalyclip")}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for trained in ("stackclip", "anomalyclip"):
            for parameter in made[trained].adapter_parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
            made[trained].config.is_trained = True
    return made


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two parts of different sizes and formats."""
    folder = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    paths = [folder / "wide.png", folder / "tall.jpg"]
    for path, (height, width) in zip(paths, [(40, 60), (70, 50)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return [str(path) for path in paths]


def published_folders(models, tiny_clip_path, root) -> dict[str, str]:
    """``zsad publish --dry-run`` of each model's checkpoint; the backbone path points at the tiny CLIP (loaded from
    there, since it exists) and ``--base-model`` names a Hub id for it, as publishing requires (with
    --tiny-backbone-for-tests: it is the tiny CLIP)."""
    folders = {}
    for method, model in models.items():
        model.config.base_model_name_or_path = str(tiny_clip_path)
        model.save_pretrained(root / f"{method}-checkpoint")
        upload = root / f"{method}-upload"
        assert main(["publish", str(root / f"{method}-checkpoint"), "--repo-id", f"org/{method}", "--dry-run", str(upload),
                     "--base-model", "zsad-tests/tiny-random-clip", "--tiny-backbone-for-tests"]) == 0
        folders[method] = str(upload)
    return folders


@pytest.mark.integration
def test_pipeline_runs_without_zsad_on_published_folders_and_matches_the_detector(models, images, tiny_backbone,
                                                                                   tiny_clip_path, tmp_path):
    folders = published_folders(models, tiny_clip_path, tmp_path)
    for folder in folders.values():
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config["custom_pipelines"][TASK]["impl"] == "pipeline_zsad.ZeroShotAnomalyDetectionPipeline"
        assert PIPELINE_FILES <= {path.name for path in (tmp_path / folder).iterdir()}
        assert "pipeline(model=\"org/" in (tmp_path / folder / "README.md").read_text()

    out = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(folders), json.dumps(images), str(THRESHOLD), str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    arrays, facts = np.load(f"{out}.npz"), json.loads((tmp_path / "results.json").read_text())

    detector = AnomalyDetector(tiny_backbone, models)
    for method in models:
        assert facts[f"{method}.class"] == "ZeroShotAnomalyDetectionPipeline"
        expected = {"single": detector.detect(images[0], CLASS_NAME, method=method)}
        expected |= {f"list{i}": result for i, result in enumerate(detector.detect_batch(images, CLASS_NAME, method=method,
                                                                                         threshold=THRESHOLD))}
        for key, detection in expected.items():
            got = facts[f"{method}.{key}"]
            assert got["score"] == pytest.approx(detection.score, abs=1e-5), (method, key)
            # The remote-code pipeline still gives a verdict at the default threshold, where the detector gives "none"
            # for an untrained or training-free method: compared at the same threshold.
            expected_verdict = verdict(detection.score, detection.threshold)
            assert (got["verdict"], got["threshold"], got["class_name"]) == (expected_verdict, detection.threshold, CLASS_NAME)
            anomaly_map = arrays[f"{method}.{key}.map"]
            assert anomaly_map.shape == detection.anomaly_map.shape and anomaly_map.dtype == np.float32
            np.testing.assert_allclose(anomaly_map, detection.anomaly_map, rtol=0, atol=1e-5)
            assert got["mask_mode"] == "L"
            np.testing.assert_array_equal(arrays[f"{method}.{key}.mask"], np.where(anomaly_map >= got["threshold"], 255, 0))
        for i, detection in enumerate(detector.detect_mutual(images, CLASS_NAME, method=method)):
            got = facts[f"{method}.mutual{i}"]
            assert (got["score"], got["verdict"], got["compared_with"]) == (pytest.approx(detection.score, abs=1e-5),
                                                                           detection.verdict, 1), (method, i)
            np.testing.assert_allclose(arrays[f"{method}.mutual{i}.map"], detection.anomaly_map, rtol=0, atol=1e-5)
    # The list run used a threshold low enough that the mask is not empty everywhere.
    assert any(arrays[f"{method}.list0.mask"].any() for method in models)


@pytest.fixture(scope="module")
def local_pipeline(models):
    return ZeroShotAnomalyDetectionPipeline(model=models["baseline"], device="cpu", precision="float32")  # the shared backbone's


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "Pass the product's name"),
        ({"class_name": "  "}, "class name is empty"),
        ({"class_name": "screw", "threshold": 1.5}, "between 0 and 1"),
        ({"class_name": "screw", "profile": "references/"}, r"Unknown argument\(s\) \['profile'\].*class_name, threshold"),
    ],
)
def test_pipeline_errors_say_what_to_pass(local_pipeline, images, arguments, message):
    with pytest.raises(zsad.ZSADError, match=message):
        local_pipeline(images[0], **arguments)


def test_pipeline_scores_a_list_against_each_other_as_the_detector_does(local_pipeline, models, tiny_backbone, images):
    lot = images + [Image.open(images[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    results = local_pipeline(lot, mutual=True, threshold=0.4)  # no class name: the baseline's text map is not used
    expected = AnomalyDetector(tiny_backbone, models).detect_mutual(lot, "object", threshold=0.4)
    assert [(r["score"], r["verdict"], r["compared_with"], r["note"], r["class_name"]) for r in results] == [
        (pytest.approx(d.score, abs=1e-6), d.verdict, 2, d.note, "object") for d in expected]
    for result, detection in zip(results, expected):
        np.testing.assert_allclose(result["anomaly_map"], detection.anomaly_map, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, detection.mask)


@pytest.mark.parametrize(
    ("pipe", "lot", "arguments", "message"),
    [
        ("baseline", "one", {}, "pass a list of at least two images"),
        ("baseline", "first", {}, "at least two images of the product, got 1"),
        ("baseline", "copies", {}, "All the images are identical"),
        ("stackclip", "both", {}, "this model is trained, so its text map is part of the mutual scores"),
        ("baseline", "both", {"profile": "references/"}, r"Unknown argument\(s\) \['profile'\]"),
    ],
)
def test_mutual_pipeline_errors_say_what_to_pass(models, images, pipe, lot, arguments, message):
    choices = {"one": images[0], "first": images[:1], "copies": [images[0], images[0]], "both": images}
    with pytest.raises(zsad.ZSADError, match=message):
        ZeroShotAnomalyDetectionPipeline(model=models[pipe], device="cpu", precision="float32")(choices[lot], mutual=True, **arguments)


def test_pipeline_reads_images_as_zsad_does(local_pipeline, images, bad_files):
    from_path = local_pipeline(images[1], class_name="screw")
    from_image = local_pipeline(Image.open(images[1]), class_name="screw")
    assert from_path["mask"].size == (50, 70) and from_path["anomaly_map"].shape == (70, 50)
    assert from_path["score"] == from_image["score"]
    with pytest.raises(zsad.ZSADError, match="Not a readable image"):
        local_pipeline(str(bad_files["unreadable"]), class_name="screw")


@pytest.fixture(scope="module")
def stackclip_checkpoint(models, tiny_clip_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint") / "stackclip"
    models["stackclip"].config.base_model_name_or_path = str(tiny_clip_path)
    models["stackclip"].save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("precision", ["auto", "int8", "float32"])
def test_pipeline_precision_means_what_it_means_for_the_detector(stackclip_checkpoint, images, precision):
    """One rule: the pipeline loaded as Hub users load it and ``AnomalyDetector.load`` put the backbone in the same
    precision ("auto": bfloat16 on a CPU with native bfloat16, else int8 vision linears) and give the same score."""
    pipe = pipeline(model=stackclip_checkpoint, trust_remote_code=True, precision=precision)
    detector = AnomalyDetector.load(["stackclip"], {"stackclip": stackclip_checkpoint}, precision=precision, device="cpu",
                                    engine="torch")
    expected = Runtime.resolve("cpu", precision).precision
    assert expected != "float32" or precision == "float32"  # "auto" on a CPU is never float32
    for backbone in (pipe.model.clip, detector.backbone):
        assert (vision_precision(backbone), text_precision(backbone)) == (expected, "float32" if expected == "float16" else expected)
    single = pipe(images[0], class_name=CLASS_NAME)
    assert single["score"] == pytest.approx(detector.detect(images[0], CLASS_NAME, method="stackclip").score, abs=1e-6)


def test_pipeline_refuses_an_unknown_precision(models):
    with pytest.raises(zsad.ZSADError, match="precision must be one of"):
        ZeroShotAnomalyDetectionPipeline(model=models["baseline"], device="cpu", precision="fp8")


def test_a_pipeline_in_another_precision_leaves_a_shared_backbone_as_it_was(tiny_backbone):
    model = tiny_model("baseline", tiny_backbone)
    pipe = ZeroShotAnomalyDetectionPipeline(model=model, device="cpu", precision="int8")
    assert vision_precision(pipe.model.require_backbone()) == "int8"
    assert pipe.model.require_backbone() is not tiny_backbone
    assert vision_precision(tiny_backbone) == "float32" and text_precision(tiny_backbone) == "float32"
