import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from zsad import ZeroShotCLIPModel
from zsad.modeling.anomaly_maps import (
    gaussian_blur,
    gaussian_blur_reflect,
    image_scores,
    patch_state_probs,
    scaled_sigma,
    state_logits,
    upsample_patch_maps,
)
from zsad.modeling.losses import dice_loss, focal_loss, image_loss, segmentation_loss

from conftest import TEST_IMAGE_SIZE


@pytest.mark.parametrize("sigma, height, width", [(4.0, 64, 64), (1.5, 37, 37), (0.3, 20, 20), (2.0, 23, 41)])
def test_gaussian_blur_matches_scipy_mirror_mode(sigma, height, width):
    maps = torch.rand(2, height, width, dtype=torch.float64)
    expected = np.stack([gaussian_filter(m.numpy(), sigma=sigma, mode="mirror", truncate=4.0) for m in maps])
    np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, atol=1e-10)


def test_gaussian_blur_repeats_the_edge_of_maps_narrower_than_its_kernel():
    maps = torch.rand(1, 5, 9, dtype=torch.float64)  # radius 8 at sigma 2: more than the 5-pixel side can mirror
    expected = gaussian_filter(maps[0].numpy(), sigma=2.0, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(gaussian_blur(maps, 2.0)[0].numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("sigma, height, width", [(4.0, 64, 64), (3.0, 7, 12)])  # the second: a radius beyond the side
def test_gaussian_blur_reflect_matches_scipy_default_mode(sigma, height, width):
    maps = torch.rand(2, height, width, dtype=torch.float64)
    expected = np.stack([gaussian_filter(m.numpy(), sigma=sigma, truncate=4.0) for m in maps])
    np.testing.assert_allclose(gaussian_blur_reflect(maps, sigma).numpy(), expected, atol=1e-10)


def test_sigma_scales_with_input_size():
    assert scaled_sigma(4.0, 518, 518) == 4.0
    assert scaled_sigma(4.0, 259, 518) == 2.0


def test_patch_state_probs_is_a_softmax_over_scaled_cosines():
    features = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]]), dim=-1)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    probs = patch_state_probs(features, text, logit_scale=2.0)
    assert probs.shape == (1, 2, 3)
    expected_abnormal = [1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-2.0 * 0.2))]
    np.testing.assert_allclose(probs[0, 1].numpy(), expected_abnormal, rtol=1e-6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 3))
    per_image_text = text.expand(1, 2, 2)
    torch.testing.assert_close(state_logits(features, per_image_text, 2.0), state_logits(features, text, 2.0))


def test_upsampling_keeps_constant_maps_constant():
    maps = torch.full((1, 2, 16), 0.25)
    assert torch.allclose(upsample_patch_maps(maps, 4, 37), torch.full((1, 2, 37, 37), 0.25))


def test_image_score_mixes_global_probability_and_map_maximum():
    anomaly_map = torch.zeros(2, 4, 4)
    anomaly_map[0, 1, 2] = 0.8
    scores, map_max = image_scores(torch.tensor([0.2, 0.6]), anomaly_map, map_weight=0.5)
    torch.testing.assert_close(map_max, torch.tensor([0.8, 0.0]))
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.3]))


def test_focal_loss_by_hand():
    probs = torch.tensor([0.9, 0.1, 0.3, 0.7]).view(1, 1, 2, 2)
    state_probs = torch.cat([1 - probs, probs], dim=1)  # channel 1 = abnormal
    masks = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    true_class = torch.tensor([0.9, 0.9, 0.3, 0.3])
    expected = (-((1 - true_class) ** 2) * true_class.log()).mean()
    torch.testing.assert_close(focal_loss(state_probs, masks, gamma=2.0), expected)


def test_dice_loss_by_hand_and_segmentation_sum():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # 1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1)
    torch.testing.assert_close(dice_loss(probs, target), torch.tensor(1 - 2.0 / 3.0))
    assert dice_loss(target, target).item() == pytest.approx(0.0)
    state = torch.stack([1 - probs.view(1, 2, 2), probs.view(1, 2, 2)], dim=1)
    mask = target.view(1, 2, 2)
    expected = focal_loss(state, mask) + dice_loss(state[:, 1], mask) + dice_loss(state[:, 0], 1 - mask)
    torch.testing.assert_close(segmentation_loss(state, mask), expected)
    torch.testing.assert_close(image_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([1])), torch.tensor(math.log(2)))


def test_baseline_map_by_hand(tiny_clip_path, tiny_backbone):
    model = ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=TEST_IMAGE_SIZE)
    pixels = torch.randn(1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    with torch.no_grad():
        output = model(pixels, class_names="bottle", masks=torch.zeros(1, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE), labels=torch.tensor([0]))
        text = model.class_text_features(["bottle"])[0]
        assert model.config.vv_attention_from == 1  # the lineage default: the first quarter point of 4 blocks
        features = tiny_backbone.encode_image(pixels, [1, 2, 3, 4], vv_attention_from=1)
        layer_maps = []
        for index in range(4):
            patches = F.normalize(tiny_backbone.project_patch_tokens(features.patch_tokens(index)), dim=-1)
            abnormal = (100.0 * patches @ text.t()).softmax(-1)[..., 1].reshape(1, 1, 8, 8)
            layer_maps.append(F.interpolate(abnormal, size=(TEST_IMAGE_SIZE,) * 2, mode="bilinear", align_corners=False)[0, 0])
        mean_map = torch.stack(layer_maps).mean(0).numpy()
        expected = gaussian_filter(mean_map, sigma=4.0 * TEST_IMAGE_SIZE / 518, mode="mirror")
        global_prob = (100.0 * features.image_embeds @ text.t()).softmax(-1)[0, 1]
    np.testing.assert_allclose(output.anomaly_map[0].numpy(), expected, atol=1e-5)
    assert output.image_score.item() == pytest.approx(0.5 * global_prob.item() + 0.5 * expected.max(), abs=1e-5)
    assert output.loss is not None and torch.isfinite(output.loss)
    assert output.layer_maps.shape == (1, 4, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    assert 0.0 <= output.anomaly_map.min() and output.anomaly_map.max() <= 1.0
