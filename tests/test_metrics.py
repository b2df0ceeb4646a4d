"""zsad.metrics against hand-computed values, scikit-learn and a per-threshold AUPRO reference."""

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from zsad.metrics import FLOAT16_KEYS, IMAGE_METRICS, PIXEL_METRICS, ThresholdCurve, image_curves, image_metrics, pixel_metrics

from metrics_reference import reference_aupro, reference_pixel_metrics


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


def _kept_points(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Positions, in scikit-learn's descending distinct thresholds, of the points ThresholdCurve keeps: every score a
    defective pixel has, and the lowest score of each run of scores that only normal pixels have."""
    values, inverse = np.unique(scores, return_inverse=True)
    has_defect = np.bincount(inverse, weights=labels, minlength=values.size)[::-1] > 0
    next_has_defect = np.append(has_defect[1:], True)
    return np.flatnonzero(has_defect | next_has_defect)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_pixel_curves_are_sklearns_curves_without_the_points_inside_normal_only_runs(dtype):
    masks, maps = _random_case(5, rounding=3)
    maps = [m.astype(dtype) for m in maps]
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    kept = _kept_points(labels, scores)
    assert kept.size < np.unique(scores).size  # some normal-only runs were merged
    curves = ThresholdCurve.from_maps(masks, maps).curves()
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)  # starts at the origin
    precision, recall, _ = precision_recall_curve(labels, scores)  # highest threshold last, then (R 0, P 1) appended
    np.testing.assert_allclose(curves.fpr, np.append(0.0, fpr[1:][kept]))
    np.testing.assert_allclose(curves.tpr, np.append(0.0, tpr[1:][kept]))
    np.testing.assert_allclose(curves.recall, recall[-2::-1][kept])
    np.testing.assert_allclose(curves.precision, precision[-2::-1][kept])
    assert np.trapezoid(curves.tpr, curves.fpr) == pytest.approx(pixel_metrics(masks, maps)["pixel_auroc"])
    assert np.trapezoid(curves.tpr, curves.fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_curves_of_float16_maps_have_one_point_per_float16_value_at_most():
    rng = np.random.default_rng(6)
    masks = [rng.random((400, 400)) < 0.05 for _ in range(4)]  # 640,000 pixels
    maps = [(rng.normal(size=mask.shape) + mask).astype(np.float16) for mask in masks]
    curves = ThresholdCurve.from_maps(masks, maps).curves()
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    points = _kept_points(np.concatenate([m.ravel() for m in masks]), scores).size
    assert len(curves.precision) == len(curves.recall) == points <= np.unique(scores).size <= FLOAT16_KEYS
    assert len(curves.fpr) == len(curves.tpr) == points + 1  # plus the origin


def _last_bit_case(seed: int):
    """float32 maps whose scores are few base values and their next few float32 neighbours (ties within and
    across classes, values that differ only in the last bits), negatives, -0 and +0."""
    rng = np.random.default_rng(seed)
    masks, _ = _random_case(seed)
    base = np.array([-0.75, -0.0, 0.0, 0.125, 0.5, 0.9], dtype=np.float32)
    maps = []
    for mask in masks:
        scores = rng.choice(base, size=mask.shape) + 0.3 * mask.astype(np.float32)
        for _ in range(rng.integers(0, 4)):  # step some pixels by one ulp, several times
            scores = np.where(rng.random(mask.shape) < 0.3, np.nextafter(scores, np.float32(np.inf)), scores)
        maps.append(scores.astype(np.float32))
    maps[0][0, :2] = [np.float32(-0.0), np.float32(0.0)]
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_maps_are_exact_with_ties_and_last_bit_differences(seed):
    masks, maps = _last_bit_case(seed)
    flat = np.concatenate([m.ravel() for m in maps])
    assert np.unique(flat).size > np.unique(np.round(flat.astype(np.float64), 6)).size  # last-bit neighbours exist
    expected = reference_pixel_metrics(masks, maps)
    result = pixel_metrics(masks, maps)
    for key in PIXEL_METRICS:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    # The same scores as float64, and rounded to float16 both ways, go through the other paths and agree with them.
    assert pixel_metrics(masks, [m.astype(np.float64) for m in maps]) == pytest.approx(result, abs=1e-12)
    maps16 = [m.astype(np.float16) for m in maps]
    assert pixel_metrics(masks, [m.astype(np.float32) for m in maps16]) == pytest.approx(pixel_metrics(masks, maps16), abs=1e-12)


def test_maps_of_mixed_dtypes_are_ranked_together():
    masks, maps = _random_case(7, rounding=4)
    mixed = [m.astype(np.float16 if index % 2 else np.float32) for index, m in enumerate(maps)]
    expected = reference_pixel_metrics(masks, [m.astype(np.float64) for m in mixed])
    assert pixel_metrics(masks, mixed) == pytest.approx(expected, abs=1e-12)


def test_curves_need_both_classes():
    assert ThresholdCurve.from_maps([np.zeros((4, 4), bool)], [np.ones((4, 4))]).curves() is None
    assert image_curves([1, 1], [0.2, 0.3]) is None
    curves = image_curves([0, 1, 1], [0.2, 0.7, 0.9])
    assert (curves.fpr[-1], curves.tpr[-1]) == (1.0, 1.0) and curves.precision.max() == 1.0


def _ranks(maps):
    """Each score replaced by its rank among all scores: every metric depends on the order only."""
    flat = np.concatenate([m.ravel() for m in maps])
    ranks = np.unique(flat, return_inverse=True)[1].astype(np.float64)
    return [r.reshape(m.shape) for r, m in zip(np.split(ranks, np.cumsum([m.size for m in maps])[:-1]), maps)]


def _crowded_case(seed: int, dtype):
    """Scores the bucketed ranking finds hard: infinities, values near the dtype's limits, and a dense cluster of
    defect scores far from the rest (buckets holding one, a few and very many defect values)."""
    rng = np.random.default_rng(seed)
    masks, _ = _random_case(seed)
    info = np.finfo(dtype)
    specials = np.array([np.inf, -np.inf, info.max, -info.max, info.tiny, info.smallest_subnormal, 0.0, -0.0], dtype)
    maps = []
    for mask in masks:
        cluster = np.nextafter(dtype(0.5), dtype(1), dtype=dtype) + rng.integers(0, 40, mask.shape) * np.spacing(dtype(0.5))
        scores = np.where(rng.random(mask.shape) < 0.5, cluster, rng.normal(size=mask.shape).astype(dtype))
        scores = np.where(rng.random(mask.shape) < 0.1, rng.choice(specials, mask.shape), scores)
        maps.append(scores.astype(dtype))
    return masks, maps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_wide_scores_with_infinities_extremes_and_dense_clusters_are_ranked_exactly(seed, dtype):
    masks, maps = _crowded_case(seed, dtype)
    ranks = _ranks(maps)
    result = pixel_metrics(masks, maps)
    assert result == pytest.approx(reference_pixel_metrics(masks, ranks), abs=1e-12)
    curves, rank_curves = ThresholdCurve.from_maps(masks, maps), ThresholdCurve.from_maps(masks, ranks)
    np.testing.assert_array_equal(curves.fp, rank_curves.fp)
    np.testing.assert_array_equal(curves.tp, rank_curves.tp)


def test_many_scores_land_exactly_whatever_the_bucket_sizes():
    """A large set against a sorted-count reference: gap and value counts per distinct defect score."""
    rng = np.random.default_rng(8)
    masks = [rng.random((300, 300)) < 0.03 for _ in range(6)]
    maps = [(rng.random(m.shape, dtype=np.float32) * 0.7 + 0.3 * m) for m in masks]
    maps[0][:50] = np.float32(0.25)  # one tie shared by thousands of pixels of both classes
    curves = ThresholdCurve.from_maps(masks, maps)
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([m.ravel() for m in masks])
    thresholds = np.unique(scores[labels])[::-1]
    tp = np.cumsum(np.unique(-scores[labels], return_counts=True)[1])
    fp = np.array([(scores[~labels] >= t).sum() for t in thresholds[::97]])
    tp_points, first = np.unique(curves.tp, return_index=True)  # a defect score's point comes before its gap's
    fp_at = dict(zip(tp_points, curves.fp[first]))
    np.testing.assert_array_equal([fp_at[t] for t in tp[::97]], fp)
    assert pixel_metrics(masks, maps)["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_nan_scores_are_refused_with_a_clear_error():
    masks, maps = _random_case(9, rounding=4)
    for dtype in (np.float16, np.float32, np.float64):
        broken = [m.astype(dtype) for m in maps]
        broken[1][2, 3] = np.nan
        with pytest.raises(ValueError, match="contains NaN"):
            pixel_metrics(masks, broken)


@pytest.mark.parametrize("shape", ["uniform", "heavy tail", "power", "outlier"])
def test_both_bucket_maps_rank_exactly_and_each_serves_its_kind_of_scores(shape):
    """Evenly spread scores take the affine map; heavy tails, power laws and a far outlier take the key map, which
    follows the values' distribution. Either way the counts equal a binary-search count."""
    from zsad.metrics import _AffineBuckets, _bucket_map, _interleaved_counts, _KeyBuckets

    rng = np.random.default_rng(10)
    scores = rng.random(200_000, dtype=np.float32)
    scores = {"uniform": scores, "heavy tail": np.exp(8 * scores), "power": scores**8,
              "outlier": np.append(scores, np.float32(1e6))}[shape]
    values = np.unique(rng.choice(scores, 5_000))
    values = np.append(values[:-1], scores.max()) if shape == "outlier" else values
    assert isinstance(_bucket_map(values), _AffineBuckets if shape == "uniform" else _KeyBuckets)
    below, up_to = np.searchsorted(values, scores, "left"), np.searchsorted(values, scores, "right")
    expected = np.bincount(2 * below + (up_to > below), minlength=2 * values.size + 1)
    np.testing.assert_array_equal(_interleaved_counts(scores, values), expected)
