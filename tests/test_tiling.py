"""Tiled detection goes through the detector's one route: the same vision pass, heads and reference fusion as a
whole-image detection, so a picture no larger than one window gives exactly ``detect``'s answer, with or without a
product profile."""

import numpy as np
import pytest
from PIL import Image

from zsad.inference import AnomalyDetector

from conftest import TEST_IMAGE_SIZE, tiny_model


def part(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector(tiny_backbone, {"baseline": tiny_model("baseline", tiny_backbone)})


@pytest.mark.parametrize("with_profile", [False, True])
def test_one_window_equals_whole_image_detection(detector, with_profile):
    profile = detector.build_profile("baseline", "wood", [part(i, (TEST_IMAGE_SIZE,) * 2) for i in range(3)]) if with_profile else None
    image = part(9, (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE))
    tiled = detector.detect_tiled(image, "wood", profile=profile)
    whole = detector.detect(image, "wood", profile=profile)
    assert tiled.tiles == 1 and tiled.references == (3 if with_profile else 0)
    assert tiled.score == pytest.approx(whole.score, abs=1e-6)
    np.testing.assert_allclose(tiled.anomaly_map, whole.anomaly_map, atol=1e-5)
    assert tiled.threshold == whole.threshold  # the profile's calibrated threshold when there is one


def test_references_change_the_tiled_answer(detector):
    goods = [part(i, (TEST_IMAGE_SIZE,) * 2) for i in range(3)]
    profile = detector.build_profile("baseline", "wood", goods)
    image = part(11, (260, 150))
    plain = detector.detect_tiled(image, "wood")
    referenced = detector.detect_tiled(image, "wood", profile=profile)
    assert plain.tiles == referenced.tiles > 1
    assert not np.allclose(plain.anomaly_map, referenced.anomaly_map, atol=1e-4)
