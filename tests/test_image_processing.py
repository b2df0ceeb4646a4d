"""The image processor: pre-processing, the torch-free bilinear map resize, settings saved and read back."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zsad import ZSADError
from zsad.modeling.image_processing_zsad import PROCESSOR_FILE, ZSADImageProcessor, normalised_pixels, resize_map

from conftest import TEST_IMAGE_SIZE


@pytest.mark.parametrize("size", [(50, 30), (7, 5), (640, 480), (16, 16), (300, 20)])
def test_resize_map_is_torch_bilinear_without_torch(size):
    anomaly_map = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    width, height = size
    reference = F.interpolate(torch.from_numpy(anomaly_map)[None, None], size=(height, width), mode="bilinear", align_corners=False)
    ours = resize_map(anomaly_map, size)
    assert ours.shape == (height, width) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference[0, 0].numpy(), atol=1e-5)


def test_resize_map_clips_to_the_unit_interval():
    assert resize_map(np.array([[-1.0, 2.0], [0.5, 0.5]], dtype=np.float32), (4, 4)).min() >= 0.0
    assert resize_map(np.array([[-1.0, 2.0], [0.5, 0.5]], dtype=np.float32), (4, 4)).max() <= 1.0


def test_processor_normalises_and_round_trips_its_settings(tmp_path):
    processor = ZSADImageProcessor(28, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.5), resample="bilinear")
    image = Image.fromarray(np.full((40, 60, 3), (255, 102, 0), dtype=np.uint8))
    pixels = processor.preprocess([image])
    assert pixels.shape == (1, 3, 28, 28)
    np.testing.assert_allclose(pixels[0, :, 5, 5], [(1.0 - 0.5) / 0.2, (0.4 - 0.4) / 0.25, (0.0 - 0.3) / 0.5], atol=1e-5)
    assert torch.equal(processor.pixel_values([image]), torch.from_numpy(pixels))
    path = processor.save_pretrained(tmp_path)
    assert path.name == PROCESSOR_FILE and json.loads(path.read_text())["resample"] == "bilinear"
    assert ZSADImageProcessor.from_pretrained(tmp_path) == processor


def test_processor_errors_say_what_to_do(tmp_path):
    with pytest.raises(ZSADError, match="Unknown resample 'nearest'"):
        ZSADImageProcessor(28, resample="nearest")
    with pytest.raises(ZSADError, match=f"has no {PROCESSOR_FILE}"):
        ZSADImageProcessor.from_pretrained(tmp_path)


def test_checkpoints_carry_the_processor_of_their_model(tiny_backbone, tmp_path):
    from zsad.runtime.loading import load_model

    model = load_model("stackclip", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE)
    model.save_pretrained(tmp_path)
    saved = ZSADImageProcessor.from_pretrained(tmp_path)
    assert saved == model.image_processor
    assert (saved.size, saved.image_mean, saved.image_std) == (TEST_IMAGE_SIZE, tiny_backbone.image_mean, tiny_backbone.image_std)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    expected = normalised_pixels([image], TEST_IMAGE_SIZE, tiny_backbone.image_mean, tiny_backbone.image_std)
    np.testing.assert_array_equal(saved.preprocess([image]), expected)
