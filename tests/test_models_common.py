"""The checks every method's model must pass, written once (``ModelTesterMixin``) and run over each method:
adapter-only saving, an exact round trip through ``AutoModel``, remote code without zsad, bad class names and the
typed output. Method-specific behaviour is tested in test_stackclip.py, test_genclip.py and test_base_model.py;
export parity per method in test_export.py (an export costs 15-45 s here, too much to repeat per check)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from zsad import GenCLIPOutput, StackCLIPOutput, ZeroShotAnomalyOutput, ZSADError
from zsad.modeling.anomaly_maps import combine_layer_maps, scaled_sigma
from zsad.modeling.modeling_genclip import GenCLIPImageDetails
from zsad.modeling.modeling_stackclip import StackCLIPImageDetails

from conftest import TEST_IMAGE_SIZE, random_pixels, tiny_model
from remote_code import run_without_zsad

CLASS_NAMES = ["bottle", "metal_nut"]


def with_changed_adapters(model, seed: int = 0):
    """``model`` with every trainable weight moved off its initial value, so a load that kept the initial weights
    (or rebuilt them from the backbone) would not reproduce the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def settings(config) -> dict:
    """A config's values, without where it was loaded from."""
    return {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}


def rounded(value, places: int = 5):
    """``value`` (nested dicts/lists of plain values) with every float rounded, for comparing across processes."""
    if isinstance(value, float):
        return round(value, places)
    if isinstance(value, dict):
        return {key: rounded(item, places) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, places) for item in value]
    return value


class ModelTesterMixin:
    """Set ``method`` (a key of ``zsad.METHODS``), ``output_class``, ``details_class`` (None: no per-image details)
    and ``code_files`` (files beyond the common ones the checkpoint must carry); override ``build`` to prepare the
    model further."""

    method: str
    output_class: type
    details_class: type | None
    code_files: set[str] = set()
    common_code_files = {"modeling_zsad_base.py", "clip_backbone.py", "prompting.py", "pipeline_zsad.py"}

    def build(self, backbone):
        return tiny_model(self.method, backbone)

    @pytest.fixture(scope="class")
    def model(self, tiny_backbone):
        return with_changed_adapters(self.build(tiny_backbone)).eval()

    @pytest.fixture(scope="class")
    def pixels(self):
        return random_pixels()

    @pytest.fixture(scope="class")
    def expected(self, model, pixels):
        with torch.no_grad():
            return model(pixels, class_names=CLASS_NAMES)

    @pytest.fixture(scope="class")
    def checkpoint(self, model, tmp_path_factory):
        folder = tmp_path_factory.mktemp(f"{self.method}-checkpoint")
        model.save_pretrained(folder)
        return folder

    def test_checkpoint_holds_the_adapters_config_and_code_only(self, model, checkpoint):
        weights = load_file(checkpoint / "model.safetensors")
        assert set(weights) == set(model.adapter_state_dict())
        assert not any(key.startswith("clip.") for key in weights)
        for key, value in weights.items():
            torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=0)
        config = json.loads((checkpoint / "config.json").read_text())
        model_class = type(model).__name__
        module = type(model).__module__.rsplit(".", 1)[-1]
        assert config["auto_map"]["AutoModel"] == f"{module}.{model_class}"
        assert AutoConfig.from_pretrained(checkpoint).model_type == model.config.model_type
        saved = {path.name for path in checkpoint.iterdir()}
        assert {f"{module}.py", "README.md"} | self.common_code_files | self.code_files <= saved, sorted(saved)

    def test_auto_model_round_trip_is_exact_and_keeps_the_backbone_frozen(self, model, checkpoint, expected, tiny_backbone, pixels):
        loaded = AutoModel.from_pretrained(checkpoint, clip_model=tiny_backbone)
        assert type(loaded) is type(model) and loaded.clip is tiny_backbone
        assert settings(loaded.config) == settings(model.config)
        for key, value in model.adapter_state_dict().items():  # weights and buffers (e.g. stacked text features)
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
        assert not loaded.clip.training and not any(p.requires_grad for p in loaded.clip.parameters())
        assert all(p.requires_grad for p in loaded.adapter_parameters())
        with torch.no_grad():
            output = loaded.eval()(pixels, class_names=CLASS_NAMES)
        torch.testing.assert_close(output.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
        torch.testing.assert_close(output.image_score, expected.image_score, rtol=0, atol=0)

    @pytest.mark.integration
    def test_remote_code_reproduces_the_model_without_zsad(self, model, checkpoint, expected, pixels, tmp_path):
        remote = run_without_zsad(checkpoint, pixels, CLASS_NAMES, expected, tmp_path)  # maps and scores to 1e-6
        assert remote["class"] == type(model).__name__
        details = expected.image_details(0)
        assert rounded(remote["details"]) == rounded(dataclasses.asdict(details) if details else None)

    @pytest.mark.parametrize(
        ("names", "message"),
        [
            ("", "class name is empty"),
            ("   ", "class name is empty"),
            ("x" * 500, "has 500 characters"),
            (["bottle"], "1 class names for 2 images"),
            (["a", "b", "c"], "3 class names for 2 images"),
            (["bottle", 7], "must be a string"),
        ],
    )
    def test_bad_class_names_raise_a_zsad_error_that_says_what_to_pass(self, model, pixels, names, message):
        with pytest.raises(ZSADError, match=message):
            model(pixels, class_names=names)

    def test_output_is_typed_in_range_and_deterministic(self, model, expected, pixels):
        assert type(expected) is self.output_class
        assert expected.anomaly_map.shape == (2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
        assert expected.layer_maps.shape == (2, len(model.config.feature_layers), TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
        assert expected.image_score.shape == expected.global_score.shape == (2,)
        # The output clamps to [0, 1] against rounding only, so compare with unclamped values: the per-layer maps
        # (probabilities, not clamped), the map as their smoothed mean, and the image score from its two parts.
        assert 0 <= expected.layer_maps.min() and expected.layer_maps.max() <= 1
        sigma = scaled_sigma(model.config.smoothing_sigma, TEST_IMAGE_SIZE, model.config.smoothing_reference_size)
        torch.testing.assert_close(expected.anomaly_map, combine_layer_maps(expected.layer_maps, sigma), rtol=0, atol=1e-6)
        torch.testing.assert_close(expected.map_score, expected.anomaly_map.flatten(1).amax(dim=1), rtol=0, atol=0)
        weight = model.config.image_score_map_weight  # image score = (1 - w) * global probability + w * the map's maximum
        torch.testing.assert_close(expected.image_score, (1 - weight) * expected.global_score + weight * expected.map_score)
        assert expected.loss is None  # no masks or labels given
        for index in range(2):
            details = expected.image_details(index)
            assert (details is None) if self.details_class is None else isinstance(details, self.details_class)
        with torch.no_grad():
            again = model(pixels, class_names=CLASS_NAMES)
        torch.testing.assert_close(again.anomaly_map, expected.anomaly_map, rtol=0, atol=0)

    def test_pixels_and_precomputed_image_features_give_the_same_output(self, model, expected, pixels):
        with torch.no_grad():
            features = model.encode_image(pixels)
            output = model(image_features=features, class_names=CLASS_NAMES)
        torch.testing.assert_close(output.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
        torch.testing.assert_close(output.image_score, expected.image_score, rtol=0, atol=0)


class TestZeroShotCLIPModel(ModelTesterMixin):
    method = "baseline"
    output_class = ZeroShotAnomalyOutput
    details_class = None


class TestStackCLIPModel(ModelTesterMixin):
    method = "stackclip"
    output_class = StackCLIPOutput
    details_class = StackCLIPImageDetails
    code_files = {"stacking.py"}

    def build(self, backbone):
        model = tiny_model(self.method, backbone, num_clusters=2)
        model.prepare_for_training(["bottle", "cable", "capsule", "screw", "metal_nut", "pill"])  # two sets of heads
        return model


class TestGenCLIPModel(ModelTesterMixin):
    method = "genclip"
    output_class = GenCLIPOutput
    details_class = GenCLIPImageDetails
    code_files = {"class_name_filter.py"}

    def build(self, backbone):
        # Non-default settings, so a load that fell back to the config defaults would differ.
        return tiny_model(self.method, backbone, cnf_mode="soft", branch_weight=0.4)
