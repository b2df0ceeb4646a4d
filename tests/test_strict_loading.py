"""Strict loading: a checkpoint whose weights do not exactly match its config (missing, unexpected, wrong-shaped or
non-finite tensors, a swapped ``model_type``) or whose config fields have the wrong type or range is refused with one
ZSADError, from ``zsad.load_model``, ``AutoModel``, the pipeline and the CLI alike; a non-finite score never becomes
a verdict."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, pipeline

import zsad
from zsad import AnomalyDetector
from zsad.cli.predict import predict_files
from zsad.modeling.pipeline_zsad import ZeroShotAnomalyDetectionPipeline
from zsad_cli import main

from conftest import tiny_model
from image_files import random_rgb


@pytest.fixture(scope="module")
def checkpoints(tiny_backbone, tmp_path_factory):
    """A saved StackCLIP and GenCLIP checkpoint on the tiny CLIP."""
    root = tmp_path_factory.mktemp("checkpoints")
    for method in ("stackclip", "genclip"):
        tiny_model(method, tiny_backbone).save_pretrained(root / method)
    return root


def damaged_copy(source, target, change_weights=None, change_config=None):
    shutil.copytree(source, target)
    if change_weights:
        tensors = load_file(target / "model.safetensors")
        change_weights(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    if change_config:
        config = json.loads((target / "config.json").read_text())
        change_config(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def drop_first(tensors):
    del tensors[sorted(tensors)[0]]


def wrong_shape(tensors):
    tensors["rpl_context"] = torch.zeros(3, 3)


def one_nan(tensors):
    tensors["rpl_context"].view(-1)[0] = float("nan")


def genclip_named_stackclip(config):
    config["model_type"] = "stackclip"
    config["auto_map"] = {"AutoConfig": "configuration_stackclip.StackCLIPConfig", "AutoModel": "modeling_stackclip.StackCLIPModel"}


DAMAGES = {
    "missing tensor": ("stackclip", drop_first, None, "tensors missing: cluster_centroids"),
    "wrong shape": ("stackclip", wrong_shape, None, "rpl_context"),
    "NaN weight": ("stackclip", one_nan, None, "NaN or infinite weights in rpl_context"),
    "model_type swapped": ("genclip", None, genclip_named_stackclip, "do not match its config .model_type 'stackclip'.*unexpected"),
    "image_size -5": ("stackclip", None, lambda c: c.update(image_size=-5), "image_size' must be a finite number in .14"),
    "image_size text": ("stackclip", None, lambda c: c.update(image_size="112"), "image_size' must be int, got '112'"),
    "feature_layers text": ("stackclip", None, lambda c: c.update(feature_layers="abc"), "feature_layers' must be list.int. or None"),
    "feature layer out of range": ("stackclip", None, lambda c: c.update(feature_layers=[1, 9]), r"feature_layers must be .* in 1\.\.4"),
}


@pytest.fixture(scope="module", params=list(DAMAGES))
def damaged(request, checkpoints, tmp_path_factory):
    method, weights, config, message = DAMAGES[request.param]
    return damaged_copy(checkpoints / method, tmp_path_factory.mktemp("damaged") / "checkpoint", weights, config), message


def test_load_model_refuses_a_damaged_checkpoint(damaged, tiny_backbone):
    folder, message = damaged
    with pytest.raises(zsad.ZSADError, match=message):
        zsad.load_model(str(folder), backbone=tiny_backbone)


def test_automodel_and_the_pipeline_refuse_it_with_the_same_error(damaged, tiny_backbone):
    folder, message = damaged
    with pytest.raises(zsad.ZSADError, match=message):
        AutoModel.from_pretrained(folder, clip_model=tiny_backbone)
    # transformers' pipeline() catches the loading error of each model class it tries and raises one ValueError
    # that quotes them: the checkpoint's own ZSADError message is in it.
    with pytest.raises(ValueError, match=message):
        pipeline(model=str(folder), trust_remote_code=True)


def test_the_cli_prints_one_line_of_it(damaged, tmp_path, capsys):
    folder, message = damaged
    Image.fromarray(random_rgb(0, 40, 40)).save(tmp_path / "part.png")
    assert main(["predict", str(tmp_path / "part.png"), "--model", str(folder), "--class-name", "screw",
                 "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("zsad predict: ") and "Traceback" not in error
    assert not (tmp_path / "out" / "scores.json").exists()


def test_intact_checkpoints_still_load_and_report_nothing_missing(checkpoints, tiny_backbone):
    for method in ("stackclip", "genclip"):
        model, info = AutoModel.from_pretrained(checkpoints / method, clip_model=tiny_backbone, output_loading_info=True)
        assert type(model).__name__.lower().startswith(method)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("image_score_map_weight", 1.5, r"image_score_map_weight' must be a finite number in \[0.0, 1.0\]"),
    ("logit_scale", float("nan"), "logit_scale' must be a finite number"),
    ("is_trained", "yes", "is_trained' must be bool"),
    ("base_model_revision", 3, "base_model_revision' must be str or None"),
])
def test_config_fields_are_checked_for_type_and_range(field, value, message):
    with pytest.raises(zsad.ZSADError, match=message):
        zsad.StackCLIPConfig(**{field: value})


def test_an_int_for_a_float_field_is_kept_as_a_float(checkpoints, tmp_path):
    folder = damaged_copy(checkpoints / "stackclip", tmp_path / "int", change_config=lambda c: c.update(fusion_weight=1))
    config = AutoConfig.from_pretrained(folder)
    assert config.fusion_weight == 1.0 and isinstance(config.fusion_weight, float)


@pytest.fixture
def nan_detector(fresh_backbone):
    """A StackCLIP whose adapters were set to NaN after loading (what NaN weights did before loading refused them)."""
    model = tiny_model("stackclip", fresh_backbone)
    with torch.no_grad():
        for parameter in model.adapter_parameters():
            parameter.fill_(float("nan"))
    return AnomalyDetector(fresh_backbone, {"stackclip": model})


def test_a_nan_score_is_an_error_record_and_scores_json_is_written(nan_detector, tmp_path):
    for index in range(3):
        Image.fromarray(random_rgb(index, 40, 40)).save(tmp_path / f"part{index}.png")
    summary = predict_files(nan_detector, [tmp_path], "screw", tmp_path / "out", batch_size=2)
    written = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert written == summary and len(written["images"]) == 3
    for record in written["images"]:
        assert "verdict" not in record and record["error"].startswith("the model returned nan")
    assert not list((tmp_path / "out").glob("*_overlay.png"))


def test_the_pipeline_raises_on_a_nan_score(nan_detector):
    pipe = ZeroShotAnomalyDetectionPipeline(model=nan_detector.model("stackclip"), device="cpu")
    with pytest.raises(zsad.ZSADError, match="returned nan as the image score"):
        pipe(Image.fromarray(random_rgb(0, 40, 40)), class_name="screw")


def test_detect_gives_no_verdict_for_a_nan_score(nan_detector):
    detection = nan_detector.detect(Image.fromarray(random_rgb(0, 40, 40)), "screw")
    with pytest.raises(zsad.ZSADError, match="no verdict"):
        detection.verdict  # noqa: B018
