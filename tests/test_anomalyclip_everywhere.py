"""A converted AnomalyCLIP checkpoint goes where every zsad model goes: the Space (offered with a checkpoint, the
product name optional), ``zsad predict`` without ``--class-name``, the model card and ``zsad publish --dry-run``."""

import json
import shutil
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.dynamic_module_utils import get_relative_import_files

from zsad import AnomalyDetector
from zsad.deploy.export import export
from zsad.deploy.runtime import ExportedDetector
from zsad.hub.convert_anomalyclip import convert_anomalyclip
from zsad.modeling.class_names import UNNAMED_PRODUCT
from zsad.modeling.modeling_anomalyclip import AnomalyCLIPModel
from zsad.modeling.pipeline_zsad import ZeroShotAnomalyDetectionPipeline
from zsad.space import config, files, handlers, layout, render
from zsad.space.config import COMPARE
from zsad.space.testing import upload

from remote_code import run_without_zsad

FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"
CLIP = str(FIXTURES / "clip")
SIZE = 56


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The fixture file converted as the authors' VisA-trained file (its folder name says so)."""
    source = tmp_path_factory.mktemp("authors") / "9_12_4_multiscale" / "epoch_15.pth"
    source.parent.mkdir()
    shutil.copy(FIXTURES / "epoch_15.pth", source)
    return convert_anomalyclip(source, tmp_path_factory.mktemp("converted") / "model", clip=CLIP, image_size=SIZE)


@pytest.fixture(scope="module")
def detector(converted) -> AnomalyDetector:
    """The Space's detector with an AnomalyCLIP checkpoint configured."""
    checkpoints = {"anomalyclip": str(converted)}
    return AnomalyDetector.load(methods=config.offered_methods(checkpoints), checkpoints=checkpoints, clip=CLIP,
                                image_size=SIZE, precision="float32", device="cpu")


@pytest.fixture(scope="module")
def part(tmp_path_factory) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (60, 70, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("part") / "part.png"
    Image.fromarray(pixels).save(path)
    return path


# ----- the Space -----------------------------------------------------------------------------------------------------

def test_the_space_offers_anomalyclip_only_with_a_checkpoint(converted):
    assert "anomalyclip" not in config.offered_methods({})
    from_flag = config.configured_checkpoints([f"anomalyclip={converted}"], {})
    from_environment = config.configured_checkpoints([], {"ZSAD_ANOMALYCLIP_CHECKPOINT": str(converted)})
    assert from_flag == from_environment == {"anomalyclip": str(converted)}
    assert config.offered_methods(from_flag)[0] == "anomalyclip"  # the trained model is the page's default
    assert config.display_name("anomalyclip") == "AnomalyCLIP"


def test_the_product_name_box_is_optional_for_anomalyclip_only(detector):
    assert "optional" in render.product_label(detector, "anomalyclip")
    assert render.product_label(detector, "baseline") == render.PRODUCT_LABEL
    assert render.product_label(detector, COMPARE) == render.PRODUCT_LABEL  # the baseline in compare needs the name


def test_picking_a_method_on_the_page_relabels_the_product_box(detector):
    demo = layout.build_demo(detector)
    boxes = {block._id: block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "class-name"}
    assert len(boxes) == 1 and "optional" in next(iter(boxes.values())).label  # AnomalyCLIP is the default method
    relabel = [fn for fn in demo.fns.values() if [block._id for block in fn.outputs] == list(boxes)]
    assert len(relabel) == 1
    assert relabel[0].fn("baseline").label == render.PRODUCT_LABEL
    assert "optional" in relabel[0].fn("anomalyclip").label


def test_the_space_scores_anomalyclip_without_a_product_name(detector, part):
    detect = handlers.make_handler(detector)
    unnamed, named = detect(upload(part), "", "anomalyclip", 0.5), detect(upload(part), "bottle", "anomalyclip", 0.5)
    direct = detector.detect(part, UNNAMED_PRODUCT, method="anomalyclip", display_side=config.DISPLAY_SIDE)
    assert unnamed.score == named.score == round(direct.score, 4)
    with pytest.raises(gr.Error, match="class name is empty"):
        detect(upload(part), "  ", "baseline", 0.5)
    with pytest.raises(gr.Error, match="class name is empty"):
        detect(upload(part), "", COMPARE, 0.5)


def test_the_batch_tab_scores_anomalyclip_without_a_product_name(detector, part):
    output = handlers.make_batch_handler(detector, files.OutputFolders())([upload(part), upload(part)], "", "anomalyclip", 0.5)
    direct = detector.detect(part, UNNAMED_PRODUCT, method="anomalyclip")
    assert [row[1] for row in output.table] == [round(direct.score, 4)] * 2


# ----- zsad predict --------------------------------------------------------------------------------------------------

def test_predict_needs_no_class_name_for_anomalyclip(converted, part, tmp_path, capsys):
    from zsad_cli import main

    out = tmp_path / "predictions"
    assert main(["predict", str(part), "--model", str(converted), "--out", str(out), "--device", "cpu",
                 "--precision", "float32"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    expected = AnomalyDetector.for_model(str(converted), precision="float32", device="cpu").detect(part, "bottle")
    assert scores["class_name"] == UNNAMED_PRODUCT and scores["images"][0]["score"] == pytest.approx(expected.score, abs=1e-6)
    assert main(["predict", str(part), "--model", "baseline", "--clip", CLIP, "--out", str(tmp_path / "b"), "--device", "cpu"]) == 2
    assert "--class-name" in capsys.readouterr().err


# ----- the card and publishing ---------------------------------------------------------------------------------------

def test_the_card_says_converted_and_gives_the_authors_results_as_reported(converted):
    card = (converted / "README.md").read_text()
    assert "converted from AnomalyCLIP's published weights" in card and "`epoch_15.pth`" in card
    assert "reported by the authors (AnomalyCLIP, Table 1)" in card
    assert "| MVTec AD | 91.5 | 91.1 | 81.4 |" in card  # the VisA-trained run, reported on MVTec AD
    assert "license: mit" in card and "No evaluation results" in card  # nothing measured is claimed


@pytest.mark.parametrize(("folder", "row"), [("9_12_4_multiscale_visa", "| VisA | 82.1 | 95.5 | 87.0 |"), ("my_run", None)])
def test_reported_results_belong_to_the_authors_published_files_only(tmp_path, folder, row):
    source = tmp_path / folder / "epoch_15.pth"
    source.parent.mkdir()
    shutil.copy(FIXTURES / "epoch_15.pth", source)
    out = convert_anomalyclip(source, tmp_path / "out", clip=CLIP, image_size=SIZE, trained_on="MVTec AD")
    card = (out / "README.md").read_text()
    if row:
        assert row in card
    else:
        assert "## Reported by the authors" not in card and json.loads((out / "config.json").read_text())["reported_results"] is None


def test_publish_dry_run_of_a_converted_checkpoint(converted, tmp_path, capsys):
    from zsad_cli import main

    folder = tmp_path / "upload"
    assert main(["publish", str(converted), "--repo-id", "someone/anomalyclip-visa", "--dry-run", str(folder),
                 "--base-model", "someone/tiny-clip"]) == 0
    assert "Dry run: nothing was uploaded" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "README.md", "modeling_anomalyclip.py"} <= {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert "someone/anomalyclip-visa" in card and "| MVTec AD | 91.5 | 91.1 | 81.4 |" in card
    assert json.loads((folder / "config.json").read_text())["base_model_hub_id"] == "someone/tiny-clip"
    from zsad.hub.publish import publishable_config

    assert publishable_config(folder).source_sha256 == json.loads((converted / "config.json").read_text())["source_sha256"]


# ----- compare, references, mutual scoring, the pipeline, export -----------------------------------------------------

def other_parts(tmp_path: Path, count: int, seed: int = 1) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = [tmp_path / f"good{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(90, 150, (50, 50, 3), dtype=np.uint8)).save(path)
    return paths


def test_compare_gives_anomalyclip_what_detect_gives(detector, part):
    compared = detector.compare(part, "bottle")
    assert set(compared) == set(config.offered_methods({"anomalyclip": "x"}))
    for method, result in compared.items():
        alone = detector.detect(part, "bottle", method=method)
        assert result.score == pytest.approx(alone.score, abs=1e-6)
        np.testing.assert_allclose(result.anomaly_map, alone.anomaly_map, rtol=0, atol=1e-6)


def test_a_profile_of_good_parts_fuses_references_into_anomalyclip(detector, part, tmp_path):
    profile = detector.build_profile("anomalyclip", "", other_parts(tmp_path, 3))
    assert profile.class_name == UNNAMED_PRODUCT and profile.num_references == 3 and profile.calibration is not None
    profile.save(tmp_path / "profile")
    with_references = detector.detect(part, None, method="anomalyclip", profile=profile)
    zero_shot = detector.detect(part, None, method="anomalyclip")
    assert with_references.references == 3 and zero_shot.references == 0
    # The references change the map; the image score is the global embedding's alone (image_score_map_weight 0).
    assert np.abs(with_references.anomaly_map - zero_shot.anomaly_map).max() > 1e-2
    assert np.isfinite(with_references.anomaly_map).all() and with_references.score == pytest.approx(zero_shot.score, abs=1e-6)
    assert with_references.threshold == pytest.approx(profile.calibration.image_threshold)


def test_mutual_scoring_includes_anomalyclip_trained_text_map_and_needs_no_name(detector, tmp_path):
    images = other_parts(tmp_path, 3, seed=2)
    unnamed = detector.detect_mutual(images, "", method="anomalyclip")
    named = detector.detect_mutual(images, "bottle", method="anomalyclip")
    assert [result.details.compared_with for result in unnamed] == [2, 2, 2]
    assert all(result.details.text_weight > 0 for result in unnamed)  # trained: its text map is part of the scores
    assert [result.score for result in unnamed] == pytest.approx([result.score for result in named], abs=1e-6)


def test_the_pipeline_runs_anomalyclip_without_a_product_name(converted, detector, part, tmp_path):

    pipe = ZeroShotAnomalyDetectionPipeline(model=AnomalyCLIPModel.from_pretrained(converted), device="cpu", precision="float32")
    result = pipe(str(part))
    expected = detector.detect(part, None, method="anomalyclip")
    assert result["class_name"] == UNNAMED_PRODUCT and result["score"] == pytest.approx(expected.score, abs=1e-5)
    np.testing.assert_allclose(result["anomaly_map"], expected.anomaly_map, rtol=0, atol=1e-5)
    lot = pipe([str(path) for path in other_parts(tmp_path, 2)], mutual=True)  # trained, yet no name needed
    assert [item["compared_with"] for item in lot] == [1, 1]


def test_the_checkpoint_carries_every_file_its_remote_code_needs(converted):
    needed = {Path(path).name for path in get_relative_import_files(str(converted / "modeling_anomalyclip.py"))}
    needed |= {Path(path).name for path in get_relative_import_files(str(converted / "pipeline_zsad.py"))}
    assert {"deep_text_prompts.py", "configuration_anomalyclip.py", "class_names.py", "losses.py"} <= needed
    assert needed <= {path.name for path in converted.iterdir()}


@pytest.mark.integration
def test_the_converted_checkpoint_loads_as_remote_code_without_zsad(converted, tmp_path):

    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = AnomalyCLIPModel.from_pretrained(converted)(pixels)
    assert run_without_zsad(converted, pixels, ["bottle"], expected, tmp_path)["class"] == "AnomalyCLIPModel"


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_exported_anomalyclip_matches_the_model(converted, tmp_path, engine):

    model = AnomalyCLIPModel.from_pretrained(converted)
    export(str(converted), None, tmp_path, format=engine)  # no product name: the graph's one column is 'object'
    graph = ExportedDetector.load(tmp_path)
    assert graph.class_names == [UNNAMED_PRODUCT]
    for seed in (1, 2):
        pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        scores, maps = graph.scores_and_maps(pixels.numpy())
        with torch.inference_mode():
            reference = model(pixels)
        assert abs(float(reference.image_score[0]) - scores[0, 0]) <= 1e-5
        assert np.abs(reference.anomaly_map[0].numpy() - maps[0, 0]).max() <= 1e-4


# ----- training ------------------------------------------------------------------------------------------------------

@pytest.mark.integration  # train/train.py runs in its own process
def test_a_training_step_lowers_the_loss_and_the_checkpoint_loads(tiny_clip_path, tiny_backbone, training_root, tmp_path):
    from zsad.data import load_dataset

    from conftest import whole_dataset_batch
    from train_script import TRAIN_SCRIPT, run_command, training_arguments

    samples = load_dataset("mvtec", training_root)
    images = len(samples)
    run_command([sys.executable, str(TRAIN_SCRIPT), *training_arguments("anomalyclip", tiny_clip_path, training_root,
                                                                         tmp_path, 1, SIZE, images)])  # one step
    trained = AnomalyCLIPModel.from_pretrained(tmp_path / "epoch-1", clip_model=tiny_backbone)
    untrained = AnomalyCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=SIZE)
    assert trained.config.is_trained and trained.config.training_epochs == 1
    assert not torch.equal(trained.prompt_context, untrained.prompt_context)
    batch = whole_dataset_batch(training_root, SIZE, tiny_backbone)
    assert int(batch["labels"].sum()) > 0 and batch["pixel_values"].shape[0] == images

    def loss(model) -> float:
        with torch.no_grad():
            return model(batch["pixel_values"], masks=batch["masks"], labels=batch["labels"]).loss.item()

    assert loss(trained) < loss(untrained)
    detection = AnomalyDetector.for_model(str(tmp_path / "epoch-1"), precision="float32", device="cpu").detect(samples[0].image_path, "")
    assert detection.method == "anomalyclip" and detection.status == "trained"
