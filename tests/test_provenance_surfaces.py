"""One image, one score on every surface at one precision; one provenance block in every result file of a run."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

import zsad
from zsad import AnomalyDetector
from zsad.space import config, handlers
from zsad.space.testing import upload
from zsad_cli import main

PRODUCT = "metal nut"
# What differs between the files of one run by design: the product name and thresholds each file applied.
PER_FILE = ("product", "threshold_rule")


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    path = tmp_path_factory.mktemp("part") / "part.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(path)
    return path


def test_the_same_image_gets_one_score_through_cli_python_pipeline_and_space(tiny_clip_path, part, tmp_path):
    clip = str(tiny_clip_path)
    assert main(["predict", str(part), "--model", "baseline", "--clip", clip, "--class-name", PRODUCT, "--precision", "float32",
                 "--device", "cpu", "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "scores.json").read_text())["images"][0]["score"]
    python = AnomalyDetector.load(methods=["baseline"], clip=clip, precision="float32", device="cpu").detect(part, PRODUCT).score
    space_detector = config.load_detector(clip, {}, precision="float32", device="cpu")  # what app.py loads
    space = space_detector.detect(part, PRODUCT, method="baseline").score
    shown = handlers.make_handler(space_detector)(upload(part), PRODUCT, "baseline", 0.5).score
    zsad.load_model("baseline", clip=clip, precision="float32").save_pretrained(tmp_path / "checkpoint")
    piped = pipeline(model=str(tmp_path / "checkpoint"), trust_remote_code=True, precision="float32")(str(part), class_name=PRODUCT)["score"]
    assert max(python, space, piped) - min(python, space, piped) < 1e-6 and abs(cli - python) < 1e-6, (cli, python, space, piped)
    assert shown == round(python, 4)  # the Space shows 4 decimals


def test_auto_precision_is_one_rule_on_every_surface(tiny_clip_path):
    clip = str(tiny_clip_path)
    expected = zsad.runtime.loading.Runtime.resolve("cpu", "auto").precision
    python = AnomalyDetector.load(methods=["baseline"], clip=clip, device="cpu")
    space = config.load_detector(clip, {}, device="cpu")
    model = zsad.load_model("baseline", clip=clip)
    blocks = [python.provenance("baseline", None, None, None), space.provenance("baseline", None, None, None),
              zsad.runtime.provenance.provenance(model)]
    assert {(block["precision"], block["text_precision"]) for block in blocks} == {
        (expected, "float32" if expected == "float32" else expected)}


def test_every_result_file_of_a_run_carries_one_provenance_block(tiny_clip_path, synthetic_root, tmp_path, capsys):
    clip = str(tiny_clip_path)
    root = synthetic_root(["tile"], num_defective=2)
    good = root / "tile" / "train" / "good"
    common = ["--model", "baseline", "--clip", clip, "--precision", "float32", "--device", "cpu"]
    assert main(["calibrate", *common, "--class-name", "tile_", "--normal", str(good), "--out", str(tmp_path / "profile")]) == 0
    assert main(["predict", str(root / "tile" / "test"), *common, "--class-name", "tile_", "--profile", str(tmp_path / "profile"),
                 "--out", str(tmp_path / "predicted")]) == 0
    assert main(["evaluate", *common, "--dataset", "mvtec", "--root", str(root), "--out", str(tmp_path / "evaluated")]) == 0
    profile = json.loads((tmp_path / "profile" / "profile.json").read_text())["provenance"]
    scores = json.loads((tmp_path / "predicted" / "scores.json").read_text())
    evaluation = json.loads((tmp_path / "evaluated" / "evaluation.json").read_text())
    blocks = [profile, scores["provenance"], *(record["provenance"] for record in scores["images"]), evaluation["provenance"]]
    shared = [{key: value for key, value in block.items() if key not in PER_FILE} for block in blocks]
    assert all(block == shared[0] for block in shared)
    assert shared[0]["model"]["name_or_path"] == "baseline" and shared[0]["backbone"]["name_or_path"] == clip
    assert shared[0]["model"]["adapter_sha256"].startswith("sha256:") and shared[0]["precision"] == "float32"
    assert scores["provenance"]["product"] == {"given": "tile_", "used": "tile"}
    assert scores["provenance"]["threshold_rule"]["image"] == scores["threshold"] and "calibrated" in scores["calibration"]
    assert evaluation["synthetic"] is True and evaluation["root"] == str(root.resolve())
    assert "on a tiny random CLIP (noise), float32 on CPU" in capsys.readouterr().out
