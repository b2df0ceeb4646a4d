"""Typed outputs per method and the per-image details a Detection carries (batches, one cluster, GenCLIP)."""

import dataclasses
import json

import pytest
import torch

from zsad import AnomalyDetector, GenCLIPOutput, StackCLIPModel, StackCLIPOutput
from zsad.modeling.class_name_filter import ClassNameChoice
from zsad.modeling.modeling_genclip import GenCLIPImageDetails
from zsad.modeling.modeling_stackclip import StackCLIPImageDetails

from conftest import TEST_IMAGE_SIZE, tiny_model


def stackclip(backbone, clusters: int) -> StackCLIPModel:
    model = tiny_model("stackclip", backbone, num_clusters=clusters)
    model.prepare_for_training(["bottle", "cable", "screw", "pill"])
    return model.eval()


def test_stackclip_batch_of_two_gives_each_image_every_stacked_name(tiny_backbone, pixels):
    model = stackclip(tiny_backbone, clusters=2)
    with torch.no_grad():
        output = model(pixels, class_names=["bottle", "screw"])
    assert isinstance(output, StackCLIPOutput) and output.cluster_weights.shape == (2, 2)
    names = model.config.stacked_names
    assert len(names) == 2 and all(isinstance(name, str) for name in names)
    for index in range(2):
        details = output.image_details(index)
        assert details == StackCLIPImageDetails(output.cluster_weights[index].tolist(), names)
        assert details.stacked_names == names  # the list of both clusters, not image 0's share of it
        assert sum(details.cluster_weights) == pytest.approx(1.0, abs=1e-5)


def test_stackclip_one_cluster_one_image_keeps_a_list(tiny_backbone, pixels):
    model = stackclip(tiny_backbone, clusters=1)
    with torch.no_grad():
        details = model(pixels[:1], class_names="cable").image_details(0)
    assert details.cluster_weights == [1.0]
    assert isinstance(details.stacked_names, list) and len(details.stacked_names) == 1


def test_genclip_details_are_each_images_own_decision(tiny_backbone, pixels):
    model = tiny_model("genclip", tiny_backbone)
    with torch.no_grad():
        output = model(pixels, class_names=["bottle", "qq7x"])
    assert isinstance(output, GenCLIPOutput) and output.vision_map.shape == output.query_map.shape == (2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    decision = output.class_name_decision
    for index, name in enumerate(["bottle", "qq7x"]):
        details = output.image_details(index)
        assert isinstance(details, GenCLIPImageDetails) and isinstance(details.class_name, ClassNameChoice)
        assert details.class_name.name_given == name and details.class_name.name_used == decision.names_used[index]
        assert details.class_name.probability == pytest.approx(float(decision.probabilities[index]))
        assert details.vision_global_score == pytest.approx(float(output.vision_global_score[index]))
        assert details.branch_weight == model.config.branch_weight


def test_detection_summary_is_json_of_the_typed_details(tiny_backbone):
    detector = AnomalyDetector(tiny_backbone, {"stackclip": stackclip(tiny_backbone, clusters=2)})
    pictures = [torch.rand(3, 64, 80).mul(255).byte().permute(1, 2, 0).numpy() for _ in range(2)]
    results = detector.detect_batch(pictures, ["bottle", "screw"], method="stackclip")
    for result in results:
        summary = json.loads(json.dumps(result.summary()))
        expected = dataclasses.asdict(result.details)
        assert summary["details"]["stacked_names"] == expected["stacked_names"]
        assert summary["details"]["cluster_weights"] == pytest.approx(expected["cluster_weights"], abs=1e-4)


def test_one_status_rule_for_models_and_configs(tiny_backbone):
    from zsad.runtime.methods import method_of, status

    baseline = tiny_model("baseline", tiny_backbone)
    genclip = tiny_model("genclip", tiny_backbone)
    assert (status(baseline), status(genclip)) == ("training-free", "untrained")
    genclip.config.is_trained = baseline.config.is_trained = True
    assert (status(baseline.config), status(genclip.config)) == ("training-free", "trained")
    assert (method_of(baseline), method_of(genclip.config)) == ("baseline", "genclip")
