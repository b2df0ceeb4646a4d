"""AnomalyCLIP converted from the authors' prompt-learner file equals their code (fixtures written by
benchmarks/check_anomalyclip.py, which runs github zqhang/AnomalyCLIP), and bad files are refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from zsad.convert_anomalyclip import convert_anomalyclip, sha256
from zsad.errors import ZSADError
from zsad.methods import METHODS
from zsad.modeling.modeling_anomalyclip import AnomalyCLIPModel
from zsad.testing import save_tiny_clip

FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
EXPECTED = load_file(FIXTURES / "expected.safetensors")
CLIP = str(FIXTURES / "clip")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_anomalyclip(FIXTURES / "epoch_15.pth", tmp_path_factory.mktemp("converted") / "model", clip=CLIP,
                               trained_on="random", image_size=56)


def case_model(converted: Path, case: dict, **overrides) -> AnomalyCLIPModel:
    size = case["image_size"]
    settings = dict(image_size=size, smoothing_reference_size=size, feature_layers=case["feature_layers"])
    return AnomalyCLIPModel.from_pretrained(converted, **{**settings, **overrides})


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_converted_model_equals_the_authors_code(converted, case):
    model = case_model(converted, case, layer_combination="sum")
    pixels = EXPECTED[f"{case['name']}.pixels"]
    with torch.no_grad():
        output = model(pixels)
    theirs = EXPECTED[f"{case['name']}.map"]
    # Their maps are summed over layers (above 1 with several): compared before the output's clipping to [0, 1].
    assert (model.combine_layer_maps(output.layer_maps, case["image_size"]) - theirs).abs().max() < 1e-4
    assert (output.image_score - EXPECTED[f"{case['name']}.score"]).abs().max() < 1e-5
    assert torch.allclose(output.anomaly_map, theirs.clamp(0, 1), atol=1e-4)


def test_default_mean_of_layers_is_their_sum_divided_by_the_layer_count(converted):
    case = next(case for case in CASES if len(case["feature_layers"]) > 1)
    with torch.no_grad():
        output = case_model(converted, case)(EXPECTED[f"{case['name']}.pixels"])
    expected = EXPECTED[f"{case['name']}.map"] / len(case["feature_layers"])
    assert (output.anomaly_map - expected).abs().max() < 1e-4


def test_resized_input_needs_their_bilinear_position_embeddings(converted):
    case = next(case for case in CASES if case["image_size"] != 56)
    with torch.no_grad():
        output = case_model(converted, case, position_interpolation="bicubic")(EXPECTED[f"{case['name']}.pixels"])
    assert (output.anomaly_map - EXPECTED[f"{case['name']}.map"]).abs().max() > 1e-3


def test_class_names_are_accepted_and_not_used(converted):
    model = AnomalyCLIPModel.from_pretrained(converted)
    pixels = EXPECTED[f"{CASES[0]['name']}.pixels"]
    with torch.no_grad():
        plain, named = model(pixels), model(pixels, class_names=["bottle", "screw"])
    assert torch.equal(plain.anomaly_map, named.anomaly_map) and torch.equal(plain.image_score, named.image_score)


def test_shared_streams_give_the_same_output(converted):
    model = AnomalyCLIPModel.from_pretrained(converted)
    pixels = EXPECTED[f"{CASES[0]['name']}.pixels"]
    with torch.no_grad():
        streams = model.clip.encode_image_streams(pixels, model.vision_streams(), "bilinear")
        alone = model(pixels)
        for shared in (streams, streams[model.config.vv_attention_from]):
            output = model(image_features=shared)
            assert torch.equal(output.anomaly_map, alone.anomaly_map) and torch.equal(output.image_score, alone.image_score)
        with pytest.raises(ZSADError, match="position_interpolation='bicubic'"):
            model(image_features=model.clip.encode_image_streams(pixels, model.vision_streams()))


def test_conversion_records_provenance_and_keeps_only_what_the_forward_uses(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["source_file"] == "epoch_15.pth" and config["source_sha256"] == sha256(FIXTURES / "epoch_15.pth")
    assert config["trained_on"] == "random" and config["is_trained"] and config["source_license"] == "MIT"
    assert config["model_type"] == "anomalyclip" and config["position_interpolation"] == "bilinear"
    with safe_open(converted / "model.safetensors", "pt") as weights:
        assert sorted(weights.keys()) == ["deep_prompts", "prompt_context"]
    state = torch.load(FIXTURES / "epoch_15.pth", weights_only=True)["prompt_learner"]
    model = AnomalyCLIPModel.from_pretrained(converted)
    assert torch.equal(model.prompt_context[1], state["ctx_neg"][0, 0])
    assert torch.equal(model.deep_prompts[1], state["compound_prompts_text.1"])
    assert METHODS["anomalyclip"] is AnomalyCLIPModel


@pytest.mark.parametrize(("folder", "dataset"), [("9_12_4_multiscale", "VisA"), ("9_12_4_multiscale_visa", "MVTec AD")])
def test_trained_on_is_read_from_the_authors_folder_names(tmp_path, folder, dataset):
    source = tmp_path / folder / "epoch_15.pth"
    source.parent.mkdir()
    shutil.copy(FIXTURES / "epoch_15.pth", source)
    out = convert_anomalyclip(source, tmp_path / "out", clip=CLIP, image_size=56)
    assert json.loads((out / "config.json").read_text())["trained_on"] == dataset


# ----- refusals -----------------------------------------------------------------------------------------------------

def prompt_learner() -> dict:
    return torch.load(FIXTURES / "epoch_15.pth", weights_only=True)["prompt_learner"]


class CodeInAPickle:
    pass


def changed(change) -> dict:
    state = prompt_learner()
    change(state)
    return {"prompt_learner": state}


BAD_FILES = {
    "a tensor": (torch.zeros(3), "holds Tensor"),
    "another dict": ({"model": prompt_learner()}, r"holds \['model'\]"),
    "an extra top-level key": ({"prompt_learner": prompt_learner(), "epoch": torch.tensor(15)}, r"holds \['epoch', 'prompt_learner'\]"),
    "a missing key": (changed(lambda state: state.pop("ctx_neg")), r"missing keys \['ctx_neg'\]"),
    "an extra key": (changed(lambda state: state.update(extra=torch.zeros(1))), r"unexpected keys \['extra'\]"),
    "a wrong shape": (changed(lambda state: state.update(ctx_neg=torch.zeros(1, 1, 11, 32))), "Wrong shapes.*ctx_neg"),
    "a pickle that needs code": ({"prompt_learner": CodeInAPickle()}, "would run code"),
    "other end tokens": (changed(lambda state: state["token_suffix_pos"].add_(0.01)), "made with another CLIP"),
}


@pytest.mark.parametrize("content", BAD_FILES, ids=list(BAD_FILES))
def test_bad_files_are_refused_saying_what_was_found(tmp_path, content):
    saved, message = BAD_FILES[content]
    path = tmp_path / "bad.pth"
    torch.save(saved, path)
    with pytest.raises(ZSADError, match=message):
        convert_anomalyclip(path, tmp_path / "out", clip=CLIP, trained_on="VisA", image_size=56)
    assert not (tmp_path / "out").exists()


def test_a_file_made_with_another_clip_is_refused(tmp_path):
    other = save_tiny_clip(tmp_path / "other-clip")  # same widths, another vocabulary
    with pytest.raises(ZSADError, match="made with another CLIP"):
        convert_anomalyclip(FIXTURES / "epoch_15.pth", tmp_path / "out", clip=str(other), trained_on="VisA", image_size=56)


def test_unknown_training_data_and_existing_output_are_refused(tmp_path):
    with pytest.raises(ZSADError, match="--trained-on"):
        convert_anomalyclip(FIXTURES / "epoch_15.pth", tmp_path / "out", clip=CLIP, image_size=56)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ZSADError, match="already exists"):
        convert_anomalyclip(FIXTURES / "epoch_15.pth", tmp_path / "taken", clip=CLIP, trained_on="VisA", image_size=56)


def test_convert_command_writes_a_checkpoint_predict_runs(tmp_path, capsys):
    from zsad.cli import main

    source = tmp_path / "9_12_4_multiscale" / "epoch_15.pth"
    source.parent.mkdir()
    shutil.copy(FIXTURES / "epoch_15.pth", source)
    out = tmp_path / "converted"
    assert main(["convert", "anomalyclip", str(source), "--out", str(out), "--clip", CLIP, "--image-size", "56"]) == 0
    assert json.loads((out / "config.json").read_text())["trained_on"] == "VisA"
    assert main(["convert", "anomalyclip", str(FIXTURES / "epoch_15.pth"), "--out", str(tmp_path / "x"), "--clip", CLIP]) == 2
    assert "--trained-on" in capsys.readouterr().err
    from PIL import Image

    from zsad.inference import AnomalyDetector

    result = AnomalyDetector.for_model(str(out), device="cpu").detect(Image.new("RGB", (60, 50), (90, 120, 30)), "anything")
    assert result.method == "anomalyclip" and 0.0 <= result.score <= 1.0 and result.anomaly_map.shape == (50, 60)
