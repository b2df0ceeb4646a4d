"""zsad.metrics against hand-computed values, scikit-learn and a per-threshold AUPRO reference."""

import numpy as np
import pytest
from metrics_reference import reference_aupro, reference_pixel_metrics

from zsad.metrics import IMAGE_METRICS, PIXEL_METRICS, image_metrics, pixel_metrics


def _random_case(seed: int, rounding: int = 2):
    rng = np.random.default_rng(seed)
    masks = [ndimage_blobs(rng, shape) for shape in [(24, 32), (24, 32), (16, 20), (30, 30)]] + [np.zeros((12, 14), bool)]
    maps = [np.round(0.4 * m + rng.random(m.shape), rounding) for m in masks]
    return masks, maps


def ndimage_blobs(rng, shape):
    """A few rectangular defect regions (some touching, so components merge) in an otherwise normal mask."""
    mask = np.zeros(shape, bool)
    for _ in range(rng.integers(1, 4)):
        top, left = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        mask[top:top + rng.integers(2, 8), left:left + rng.integers(2, 8)] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_sklearn_and_the_per_threshold_aupro_reference(seed):
    masks, maps = _random_case(seed)
    expected = reference_pixel_metrics(masks, maps)
    for dtype in (np.float64, np.float32):
        result = pixel_metrics(masks, [m.astype(dtype) for m in maps])
        for key in PIXEL_METRICS:
            assert result[key] == pytest.approx(expected[key], abs=1e-4), key


def test_float16_maps_use_the_bit_pattern_keys_and_stay_exact():
    masks, maps = _random_case(3, rounding=4)
    maps16 = [(m - 0.5).astype(np.float16) for m in maps]  # negative scores and -0 included
    maps16[0][0, 0] = np.float16(-0.0)
    maps16[0][0, 1] = np.float16(0.0)
    expected = reference_pixel_metrics(masks, [m.astype(np.float64) for m in maps16])
    result = pixel_metrics(masks, maps16)
    for key in PIXEL_METRICS:
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key


def test_f1_max_by_hand():
    # thresholds 0.8: P=1, R=1/2 -> F1 2/3; 0.4: P=2/3, R=1 -> F1 0.8; 0.35: P=2/3, R=1/2 -> 4/7; 0.1: P=1/2, R=1 -> 2/3
    assert image_metrics([0, 1, 0, 1], [0.1, 0.35, 0.4, 0.8])["image_f1_max"] == pytest.approx(0.8)
    masks = [np.array([[True, False], [False, True]])]
    maps = [np.array([[0.9, 0.8], [0.1, 0.2]])]  # best: threshold 0.2, P=2/3, R=1 -> F1 0.8
    assert pixel_metrics(masks, maps)["pixel_f1_max"] == pytest.approx(0.8)


def test_aupro_by_hand():
    # One region of 2 pixels and 8 normal pixels. Thresholds from the top: 0.9 -> (FPR 0, PRO 0.5);
    # 0.8 -> (FPR 1/8, PRO 0.5); 0.7 -> (FPR 1/8, PRO 1); 0.6 -> (FPR 2/8, PRO 1); 0.5 -> (FPR 3/8, PRO 1).
    # Area to 0.3: jump at 1/8 from 0.5 to 1 -> 0.5 * 1/8 + 1 * (0.3 - 1/8) = 0.0625 + 0.175 = 0.2375.
    mask = np.zeros((2, 5), bool)
    mask[0, :2] = True
    scores = np.array([[0.9, 0.7, 0.8, 0.6, 0.5], [0.4, 0.3, 0.2, 0.1, 0.0]])
    result = pixel_metrics([mask], [scores])["pixel_aupro"]
    assert result == pytest.approx(0.2375 / 0.3)
    assert reference_aupro([mask], [scores]) == pytest.approx(0.2375 / 0.3)
    # Two regions: PRO is the mean over regions, not over pixels. Region A (3 px) fully found at FPR 0,
    # region B (1 px) found only after all normal pixels: PRO = 0.5 up to FPR 0.3 -> AUPRO 0.5.
    mask = np.array([[1, 1, 1, 0, 0, 0, 0, 1]], bool)
    scores = np.array([[0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.1]])
    assert pixel_metrics([mask], [scores])["pixel_aupro"] == pytest.approx(0.5)


def test_perfect_maps_give_one():
    masks, _ = _random_case(4)
    perfect = [m.astype(np.float32) * 0.9 + 0.05 for m in masks]
    assert all(value == pytest.approx(1.0) for value in pixel_metrics(masks, perfect).values())
    assert all(value == pytest.approx(1.0) for value in image_metrics([0, 1, 1], [0.2, 0.7, 0.9]).values())


def test_degenerate_inputs_give_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="No defective image"):
        assert all(np.isnan(v) for v in image_metrics([0, 0], [0.1, 0.2]).values())
    with pytest.warns(RuntimeWarning, match="No normal image"):
        assert set(image_metrics([1, 1], [0.1, 0.2])) == set(IMAGE_METRICS)
    with pytest.warns(RuntimeWarning, match="No defective pixel"):
        assert all(np.isnan(v) for v in pixel_metrics([np.zeros((4, 4), bool)], [np.ones((4, 4))]).values())
    with pytest.raises(ValueError, match="same shape"):
        pixel_metrics([np.zeros((4, 4), bool)], [np.ones((4, 5))])
