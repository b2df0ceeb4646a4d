"""zsad.detection.results: the one threshold rule, the one Detection builder, full-resolution maps and masks; numpy only."""

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from zsad import ZSADError
from zsad.detection.results import MUTUAL_CALIBRATION, NO_VERDICT_LINE, build_detection, thresholds


@dataclass
class Calibrated:
    image_threshold: float
    pixel_threshold: float

    def describe(self) -> str:
        return "calibrated on 4 good images"


def test_the_threshold_rule_given_then_calibrated_then_half():
    calibration = Calibrated(0.62, 0.41)
    assert thresholds(None) == (0.5, 0.5, "uncalibrated (threshold 0.5)")
    assert thresholds(0.3) == (0.3, 0.3, "uncalibrated (threshold 0.3 set by hand)")
    assert thresholds(0.5) == (0.5, 0.5, "uncalibrated (threshold 0.5 set by hand)")  # chosen, unlike the default
    assert thresholds(None, calibration) == (0.62, 0.41, "calibrated on 4 good images")
    assert thresholds(0.7, calibration) == (0.7, 0.7, "calibrated on 4 good images; threshold 0.7 set by hand (the calibrated rate does not apply)")


def detection_of(model_map: np.ndarray, picture_size: tuple[int, int], original_size: tuple[int, int], chosen,
                 status: str = "training-free"):
    picture = Image.new("RGB", picture_size, (90, 90, 90))
    return build_detection(method="baseline", status=status, class_name="bottle", score=0.55, picture=picture,
                           thresholds=chosen, model_map=model_map, original_size=original_size)


def test_mask_and_full_resolution_mask_use_the_pixel_threshold_not_the_image_threshold():
    model_map = np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (16, 1))  # left to right 0 -> 1
    result = detection_of(model_map, (40, 30), (160, 120), thresholds(None, Calibrated(0.62, 0.41)))
    assert (result.threshold, result.pixel_threshold, result.mask_threshold) == (0.62, 0.41, 0.41)
    assert result.verdict == "normal" and result.anomaly_map.shape == result.mask.shape == (30, 40)
    np.testing.assert_array_equal(result.mask, result.anomaly_map >= 0.41)
    full_map, full_mask = result.full_resolution_map(), result.full_resolution_mask()
    assert full_map.shape == full_mask.shape == (120, 160)
    np.testing.assert_array_equal(full_mask, full_map >= 0.41)
    # Pixels between the two thresholds: in the mask shown and in the download, where the image threshold would drop them.
    between = (full_map >= 0.41) & (full_map < 0.62)
    assert between.any() and full_mask[between].all()
    assert abs(full_mask.mean() - result.mask.mean()) < 0.03  # the same mask, at two sizes


def test_an_uncalibrated_detection_has_one_threshold_and_its_map_at_the_image_size():
    model_map = np.zeros((8, 8), dtype=np.float32)
    model_map[2:4, 5:7] = 0.9
    result = detection_of(model_map, (64, 48), (64, 48), thresholds(0.5))  # set by hand: a verdict
    assert result.pixel_threshold is None and result.mask_threshold == 0.5
    assert result.full_resolution_map() is result.anomaly_map
    assert result.mask[14:22, 42:54].all() and not result.mask[:10].any() and result.mask.sum() < result.mask.size / 4
    assert result.summary()["pixel_threshold"] == 0.5 and result.overlay.size == (64, 48)


def test_detection_and_the_deploy_runtime_import_without_torch():
    script = ("import json, sys\nsys.modules['torch'] = None\nimport zsad.detection.results, zsad.deploy.runtime, zsad.cli.predict\n"
              "print(json.dumps(sorted(name for name in ('torch', 'transformers', 'accelerate') if sys.modules.get(name))))")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(completed.stdout) == []


@pytest.mark.parametrize("score, expected", [(0.62, "anomalous"), (0.6199, "normal")])
def test_the_verdict_is_at_the_image_threshold(score, expected):
    result = detection_of(np.zeros((4, 4), dtype=np.float32), (8, 8), (8, 8), thresholds(None, Calibrated(0.62, 0.41)))
    result.score = score
    assert result.verdict == expected and result.is_anomalous == (expected == "anomalous")


@pytest.mark.parametrize("status", ["untrained", "training-free"])
def test_no_verdict_at_the_default_threshold_for_an_untrained_or_training_free_method(status):
    result = detection_of(np.zeros((4, 4), dtype=np.float32), (8, 8), (8, 8), thresholds(None), status=status)
    assert result.score == 0.55 and result.anomaly_map.shape == (8, 8)  # a score and a map, no verdict
    assert (result.verdict, result.is_anomalous, result.verdict_line) == ("none", None, NO_VERDICT_LINE)
    summary = result.summary()
    assert (summary["verdict"], summary["threshold"]) == ("none", None)
    assert "references of good parts" in summary["verdict_line"] and "--threshold" in summary["verdict_line"]
    result.score = float("nan")
    with pytest.raises(ZSADError, match="as the image score, so there is no verdict"):
        result.verdict  # noqa: B018 - a non-finite score is an error, with or without a verdict


@pytest.mark.parametrize("status, chosen, line", [
    ("trained", thresholds(None), "anomalous at threshold 0.500 (uncalibrated (threshold 0.5))"),
    ("untrained", thresholds(0.5), "anomalous at threshold 0.500 (uncalibrated (threshold 0.5 set by hand))"),
    ("untrained", thresholds(None, Calibrated(0.6, 0.4)), "normal at threshold 0.600 (calibrated on 4 good images)"),
    ("training-free", (0.5, 0.5, f"{MUTUAL_CALIBRATION}uncalibrated (threshold 0.5)"),
     "anomalous at threshold 0.500 (mutual: scored against its group; uncalibrated (threshold 0.5))"),
])
def test_a_chosen_calibrated_trained_or_mutual_threshold_gives_a_verdict_naming_it(status, chosen, line):
    result = detection_of(np.zeros((4, 4), dtype=np.float32), (8, 8), (8, 8), chosen, status=status)
    assert result.verdict_line == line and result.summary()["threshold"] == chosen[0]
