"""Exact anomaly-detection metrics: image AUROC / AP / F1-max and pixel AUROC / AP / F1-max / AUPRO.

```python
>>> from zsad.metrics import image_metrics, pixel_metrics
>>> image_metrics(labels=[0, 0, 1, 1], scores=[0.1, 0.4, 0.35, 0.8])
{'image_auroc': 0.75, 'image_ap': 0.833..., 'image_f1_max': 0.8}
>>> pixel_metrics(masks, maps)   # lists of (H, W) arrays, sizes may differ between images
{'pixel_auroc': ..., 'pixel_ap': ..., 'pixel_f1_max': ..., 'pixel_aupro': ...}
```

Pixel metrics are exact (every distinct score is a threshold, ties handled as scikit-learn does). Ground-truth
connected components are labelled once, and each defective pixel carries the PRO weight ``1 / (number of regions *
region size)``. Histograms of normal pixels, defect pixels and PRO weight, summed from the highest score down, give
TPR, FPR, precision and the per-region overlap (PRO) at every threshold. float16 maps (what ``zsad.evaluation.protocol``
stores) have 65,536 possible scores: each gets an unsigned integer key from its IEEE bit pattern, ordered like the
scores, and one ``bincount`` per map counts them, O(N). Wider scores (float32 as they are, other dtypes as float64)
are counted in the bins between and at the distinct scores of defective pixels (runs of scores that only normal
pixels have are one bin, which changes no metric, see ``ThresholdCurve``), placed by bucketing, O(N), not by a sort
(see ``_interleaved_counts``). Degenerate inputs (one class only, no defect region) give NaN with a warning; NaN
scores are refused. The same counts give the plotted pixel ROC and precision-recall points
(``ThresholdCurve.curves``): exact, at most one point per distinct score, so at most 65,536 for float16 maps however
many pixels there are.
"""

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
METRICS = IMAGE_METRICS + PIXEL_METRICS
# How each metric is shown: (short, for table columns; full, for model cards).
METRIC_NAMES = {
    "image_auroc": ("I-AUROC", "Image AUROC"),
    "image_ap": ("I-AP", "Image AP"),
    "image_f1_max": ("I-F1max", "Image F1-max"),
    "pixel_auroc": ("P-AUROC", "Pixel AUROC"),
    "pixel_ap": ("P-AP", "Pixel AP"),
    "pixel_f1_max": ("P-F1max", "Pixel F1-max"),
    "pixel_aupro": ("AUPRO", "Pixel AUPRO"),
}


def metric_name(key: str, short: bool = False) -> str:
    """A metric's display name ("Image AUROC", or "I-AUROC" with ``short``); unknown keys read as words."""
    names = METRIC_NAMES.get(key)
    return names[0 if short else 1] if names else key.replace("_", " ")
AUPRO_MAX_FPR = 0.3
FLOAT16_KEYS = 1 << 16


class Curves(NamedTuple):
    """ROC and precision-recall points of one set of scores (for plotting)."""

    fpr: np.ndarray
    tpr: np.ndarray
    recall: np.ndarray
    precision: np.ndarray


def image_metrics(labels, scores) -> dict[str, float]:
    """Image AUROC, AP and F1-max of scores against 0/1 labels (scikit-learn); NaN if only one class."""
    labels, scores = np.asarray(labels).astype(bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if _one_class(bool(labels.any()), bool((~labels).any()), "image"):
        return dict.fromkeys(IMAGE_METRICS, float("nan"))
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "image_ap": float(average_precision_score(labels, scores)),
        "image_f1_max": _f1_max(precision, recall),
    }


def image_curves(labels, scores) -> Curves | None:
    """ROC and precision-recall points of image scores (scikit-learn); None if only one class."""
    labels, scores = np.asarray(labels).astype(bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.all() or not labels.any():
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return Curves(fpr, tpr, recall, precision)


def pixel_metrics(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], max_fpr: float = AUPRO_MAX_FPR) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO (integrated to ``max_fpr``, divided by it) over all pixels of all maps.

    ``masks[i]`` (bool, H_i x W_i) and ``maps[i]`` (same shape) may differ in size between images."""
    if len(masks) != len(maps) or any(np.shape(m) != np.shape(a) for m, a in zip(masks, maps)):
        raise ValueError("pixel_metrics needs one map of the same shape per mask.")
    curve = ThresholdCurve.from_maps(masks, maps)
    if _one_class(curve.positives > 0, curve.negatives > 0, "pixel"):
        return dict.fromkeys(PIXEL_METRICS, float("nan"))
    return {"pixel_auroc": curve.auroc(), "pixel_ap": curve.average_precision(), "pixel_f1_max": curve.f1_max(),
            "pixel_aupro": curve.aupro(max_fpr)}


class ThresholdCurve:
    """Cumulative counts from the highest score down (threshold = score >= t): one point per distinct score that
    a defective pixel has, and one per run of consecutive scores that only normal pixels have. Points inside such
    a run lie on a straight segment of every curve (TPR, recall and PRO do not change along it), so leaving them
    out changes no metric, while the curves of float32 maps keep a size of the order of the defect pixels."""

    def __init__(self, negative_hist: np.ndarray, positive_hist: np.ndarray, pro_hist: np.ndarray, num_regions: int):
        starts = _point_starts(negative_hist, positive_hist)
        self.fp = _reverse_cumsum(negative_hist, starts)
        self.tp = _reverse_cumsum(positive_hist, starts)
        self.pro = _reverse_cumsum(pro_hist, starts) / max(num_regions, 1)
        self.negatives = int(self.fp[-1]) if self.fp.size else 0
        self.positives = int(self.tp[-1]) if self.tp.size else 0

    @classmethod
    def from_maps(cls, masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> "ThresholdCurve":
        dtype = _score_dtype(maps)
        pixels = _labelled_pixels(masks, maps, dtype)
        return cls(*(_counted_histograms(pixels) if dtype == np.float16 else _ranked_histograms(pixels)))

    def curves(self) -> Curves | None:
        """ROC and precision-recall points at every curve point (exact, see the class); None if only one class."""
        if not (self.positives and self.negatives):
            return None
        fpr, tpr = self._roc()
        return Curves(fpr, tpr, self.tp / self.positives, self._precision())

    def auroc(self) -> float:
        fpr, tpr = self._roc()
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """sum_n (R_n - R_{n-1}) P_n, as scikit-learn's ``average_precision_score``."""
        recall = _with_origin(self.tp / self.positives)
        return float(np.sum(np.diff(recall) * self._precision()))

    def f1_max(self) -> float:
        return _f1_max(self._precision(), self.tp / self.positives)

    def aupro(self, max_fpr: float = AUPRO_MAX_FPR) -> float:
        """Area under PRO(FPR) from 0 to ``max_fpr`` (PRO linearly interpolated there), divided by ``max_fpr``."""
        fpr, pro = _with_origin(self.fp / self.negatives), _with_origin(self.pro)
        end = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:end] <= max_fpr
        area = np.trapezoid(pro[:end], fpr[:end])
        if end < fpr.size:
            pro_at_limit = np.interp(max_fpr, fpr[end - 1:end + 1], pro[end - 1:end + 1])
            area += (max_fpr - fpr[end - 1]) * (pro[end - 1] + pro_at_limit) / 2
        return float(area / max_fpr)

    def _roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) from the origin (nothing flagged) to (1, 1)."""
        return _with_origin(self.fp / self.negatives), _with_origin(self.tp / self.positives)

    def _precision(self) -> np.ndarray:
        return self.tp / np.maximum(self.tp + self.fp, 1)


def _point_starts(negative_hist: np.ndarray, positive_hist: np.ndarray) -> np.ndarray:
    """First histogram bin of each curve point: every bin with defective pixels, and the first bin of each run of
    bins with normal pixels only (empty bins belong to the point before them)."""
    used = np.flatnonzero(negative_hist + positive_hist)
    defect = positive_hist[used] > 0
    return used[defect | np.concatenate([[True], defect[:-1]])]


def _reverse_cumsum(hist: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums per point from the highest score down."""
    return np.cumsum(np.add.reduceat(hist, starts)[::-1]) if starts.size else np.zeros(0, hist.dtype)


class _Pixels(NamedTuple):
    """One map's pixels: scores (flat), which are defective, the PRO weight of each defective pixel, region count."""

    scores: np.ndarray
    defect: np.ndarray
    pro_weights: np.ndarray
    num_regions: int


def _score_dtype(maps: Sequence[np.ndarray]) -> np.dtype:
    """float16 or float32 when every map fits it exactly, float64 otherwise."""
    dtype = np.result_type(*{np.asarray(m).dtype for m in maps})
    return dtype if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def _labelled_pixels(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], dtype: np.dtype) -> Iterator[_Pixels]:
    """Image by image (lazily, so temporaries stay the size of one map): scores and ground-truth regions."""
    for mask, scores in zip(masks, maps):
        mask = np.asarray(mask, dtype=bool)
        regions, count = ndimage.label(mask)  # 4-connected ground-truth regions, as in the MVTec-AD code
        defect = mask.ravel()
        region_of_pixel = regions.ravel()[defect]
        weights = 1.0 / np.bincount(region_of_pixel)[region_of_pixel] if count else np.zeros(0)
        yield _Pixels(np.asarray(scores, dtype=dtype).ravel(), defect, weights, count)


def _order_key(scores: np.ndarray) -> np.ndarray:
    """Unsigned integers of the scores' width in the order of the scores, from the IEEE bit pattern (the radix
    sort trick: negative values get every bit flipped, positive ones the sign bit set); -0 gets +0's key.
    Integer operations only: float16 arithmetic in NumPy is ~50x slower."""
    width = 8 * scores.dtype.itemsize
    unsigned = np.dtype(f"u{scores.dtype.itemsize}").type
    sign = unsigned(1) << unsigned(width - 1)
    bits = scores.view(unsigned)
    keys = bits ^ ((unsigned(0) - (bits >> unsigned(width - 1))) | sign)
    keys += keys == sign - unsigned(1)  # -0 (the sign bit alone) lands just below +0
    return keys


def _counted_histograms(pixels: Iterable[_Pixels]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Histograms over all 65,536 float16 keys, one bincount per map: O(N), and only one map's keys at once."""
    negative = np.zeros(FLOAT16_KEYS, dtype=np.int64)
    positive = np.zeros(FLOAT16_KEYS, dtype=np.int64)
    pro = np.zeros(FLOAT16_KEYS, dtype=np.float64)
    num_regions = 0
    for scores, defect, weights, count in pixels:
        keys = _order_key(scores)
        negative += np.bincount(keys[~defect], minlength=FLOAT16_KEYS)
        positive += np.bincount(keys[defect], minlength=FLOAT16_KEYS)
        pro += np.bincount(keys[defect], weights=weights, minlength=FLOAT16_KEYS)
        num_regions += count
    nan_keys = np.r_[:_FLOAT16_MINUS_INF_KEY, _FLOAT16_INF_KEY + 1:FLOAT16_KEYS]
    if (negative[nan_keys] + positive[nan_keys]).any():
        raise _nan_error()
    return negative, positive, pro, num_regions


_FLOAT16_INF_KEY, _FLOAT16_MINUS_INF_KEY = (int(_order_key(np.array([v], np.float16))[0]) for v in (np.inf, -np.inf))


def _ranked_histograms(pixels: Iterable[_Pixels]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Histograms of wider scores over the distinct scores of defective pixels and the gaps between them (a gap
    holds normal pixels only: one curve point, see ``ThresholdCurve``): bins gap, value, gap, value, ..., gap."""
    all_scores, defect_scores, defect_weights, num_regions = [], [], [], 0
    for scores, defect, weights, count in pixels:
        all_scores.append(scores)
        defect_scores.append(scores[defect])
        defect_weights.append(weights)
        num_regions += count
    scores = np.concatenate(all_scores)
    del all_scores
    values, which_value = np.unique(np.concatenate(defect_scores), return_inverse=True)  # -0 and +0 are one value
    if np.isnan(values[-1:]).any():
        raise _nan_error()
    positive, pro = np.zeros(2 * values.size + 1, dtype=np.int64), np.zeros(2 * values.size + 1, dtype=np.float64)
    positive[1::2] = np.bincount(which_value, minlength=values.size)
    pro[1::2] = np.bincount(which_value, weights=np.concatenate(defect_weights), minlength=values.size)
    return _interleaved_counts(scores, values) - positive, positive, pro, num_regions


# Buckets per distinct defect score in ``_interleaved_counts``: more buckets leave fewer scores to resolve one by
# one, but the bucket tables fall out of the CPU caches (4-8 measured fastest on 13M scores with 260K values).
_BUCKETS_PER_VALUE = 4
_MAX_BUCKETS = 1 << 22
_CHUNK = 1 << 16
_COUNT_BLOCK = 1 << 21
# Scores in a bucket with more values than this are placed by binary search, not one comparison per value.
_MAX_LINEAR_VALUES = 8
# The affine map is used while at most this share of the values shares a bucket with a smaller one (about 12% for
# uniformly spread values at 4 buckets per value; most values of a heavy tail or a cluster).
_MAX_SHARED_VALUES = 0.3


def _interleaved_counts(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many scores fall in each bin gap_0, values[0], gap_1, values[1], ..., gap_d (``values`` sorted, distinct).

    Written by hand because NumPy has no fast rank query: sorting all scores (np.sort, 5-10 ns per score on most
    CPUs) is 40-50 ns per score on AMD Zen 4, where NumPy's AVX-512 sort hits a microcoded instruction
    (numpy/x86-simd-sort#6), and np.searchsorted into the values costs over 100 ns per score. Instead every score
    gets a bucket from a monotone map of its value, O(1) each (``_bucket_map``: affine when the values are spread
    evenly, else one that follows their distribution): a bucket holding no value puts its scores in one known gap,
    a bucket holding one value needs one comparison, and only scores in buckets with several values (a few percent)
    are resolved one by one. Exact for any non-NaN scores, whatever the rounding: the map is monotone, so a
    bucket's order against the values' buckets is the scores' order against the values."""
    count = values.size
    if count == 0:
        return np.array([scores.size], dtype=np.int64)
    bucket = _bucket_map(values)
    table = _BucketTable(bucket, values)
    codes = np.empty(scores.size, dtype=np.int32)
    for start in range(0, scores.size, _CHUNK):
        chunk, code = scores[start:start + _CHUNK], codes[start:start + _CHUNK]
        if np.isnan(chunk).any():
            raise _nan_error()
        # mode="clip" skips the bounds checks (the indices are in range by construction): a quarter faster.
        np.take(table.base_code, bucket(chunk), out=code, mode="clip")
        # An empty bucket's gap code points at the first value above it, a one-value bucket's at that value.
        bound = np.take(table.padded_values, code >> 1, mode="clip")
        code += chunk > bound
        code += chunk >= bound
    # bincount widens its input to intp: a block at a time keeps that copy small enough to be reused.
    counts = sum(np.bincount(codes[start:start + _COUNT_BLOCK], minlength=table.several + 1) for start in range(0, codes.size, _COUNT_BLOCK))
    counts = counts[:table.several] + np.bincount(table.resolve(scores[codes == table.several]), minlength=table.several)
    return counts


def _bucket_map(values: np.ndarray):
    """The cheaper affine map when it spreads the values (scores spread over a range, as most maps are), else the
    key map, which follows heavy tails, outliers and clusters."""
    affine = _AffineBuckets(values, min(_BUCKETS_PER_VALUE * values.size, _MAX_BUCKETS))
    buckets = affine(values)  # ascending, as the values are
    shared = np.count_nonzero(buckets[1:] == buckets[:-1]) / values.size  # values in a bucket after its first
    return affine if shared <= _MAX_SHARED_VALUES else _KeyBuckets(values, _BUCKETS_PER_VALUE)


class _BucketTable:
    """Per bucket: the code of its scores before the one comparison (2 * gap index, or the ``several`` marker)
    and where its values start; ``resolve`` places the scores of buckets with several values."""

    def __init__(self, bucket: "_AffineBuckets | _KeyBuckets", values: np.ndarray):
        self.bucket, self.values = bucket, values
        self.values_per_bucket = np.bincount(bucket(values), minlength=bucket.size)
        self.first_value = np.cumsum(self.values_per_bucket) - self.values_per_bucket
        self.several = 2 * values.size + 1
        self.base_code = np.where(self.values_per_bucket > 1, self.several, 2 * self.first_value).astype(np.int32)
        self.padded_values = np.append(values, np.array(np.nan, values.dtype))  # NaN compares False

    def resolve(self, scores: np.ndarray) -> np.ndarray:
        """Bin codes (2 * gap, or 2 * value index + 1): one comparison per value of the bucket, binary search in
        buckets with many values."""
        buckets = self.bucket(scores)
        first, number = self.first_value[buckets], self.values_per_bucket[buckets]
        many = number > _MAX_LINEAR_VALUES
        below = first.copy()
        below[many] = np.searchsorted(self.values, scores[many])
        linear = np.where(many, 0, number)
        for step in range(int(linear.max(initial=0))):
            below += (linear > step) & (np.take(self.padded_values, first + step, mode="clip") < scores)
        equal = np.take(self.padded_values, below) == scores
        return 2 * below + equal


class _AffineBuckets:
    """bucket(x) = int(clip((x - lo) * scale + 1, 0, size - 1)) in the values' float type, lo and scale from their
    finite range: every rounding step is monotone, so the map is too; scores below the values land in bucket 0.
    ``lo`` is finite and ``scale`` finite and positive, so no step makes a NaN (an overflow gives an infinity)."""

    def __init__(self, values: np.ndarray, inner: int):
        finite = values[np.isfinite(values)]
        lo = float(finite[0]) if finite.size else 0.0
        spread = float(finite[-1]) - lo if finite.size else 0.0  # Python floats: an overflow is inf, not a warning
        scale = min((inner - 1) / spread, np.finfo(values.dtype).max) if 0 < spread < np.inf else 1.0
        self.lo, self.scale, self.one = values.dtype.type(lo), values.dtype.type(scale), values.dtype.type(1)
        self.size = inner + 2

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # scores far outside the values' range become infinite: still in order
            position = np.subtract(scores, self.lo)
            np.multiply(position, self.scale, out=position)
            np.add(position, self.one, out=position)
        np.clip(position, 0, self.size - 1, out=position)
        return position.astype(np.int32)


class _KeyBuckets:
    """A monotone bucket map that follows the values' distribution: the top 16 bits of a score's order key (sign,
    exponent and the leading mantissa bits: 1/128 of a power of two for float32) pick a coarse range, and each
    coarse range is split in as many equal key intervals as ``per_value`` times the values in it (a power of two,
    one per key at most, so no float32 bucket ever holds two values). Uniform, heavy-tailed or clustered scores
    alike leave few buckets with several values."""

    COARSE_BITS = 16

    def __init__(self, values: np.ndarray, per_value: int):
        width = 8 * values.dtype.itemsize
        self.fine_bits = width - self.COARSE_BITS
        coarse = self._coarse(_order_key(values))
        values_per_coarse = np.bincount(coarse, minlength=1 << self.COARSE_BITS)
        wanted = np.ceil(np.log2(np.maximum(per_value * values_per_coarse, 1))).astype(np.int64)
        split_bits = np.minimum(wanted, min(self.fine_bits, 24))
        self.shift = (self.fine_bits - split_bits).astype(f"u{values.dtype.itemsize}")
        self.offset = np.concatenate([[0], np.cumsum(1 << split_bits)]).astype(self.shift.dtype)
        self.size = int(self.offset[-1])
        self.fine_mask = self.shift.dtype.type((1 << self.fine_bits) - 1)

    def _coarse(self, keys: np.ndarray) -> np.ndarray:
        return (keys >> keys.dtype.type(self.fine_bits)).astype(np.intp)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        keys = _order_key(scores)
        coarse = self._coarse(keys)
        fine = (keys & self.fine_mask) >> np.take(self.shift, coarse, mode="clip")
        return np.take(self.offset, coarse, mode="clip") + fine


def _nan_error() -> ValueError:
    return ValueError("An anomaly map contains NaN: pixel metrics need finite or infinite scores; check the model's output.")


def _with_origin(values: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], values])


def _f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(np.float64).tiny)
    return float(np.max(f1))


def _one_class(has_positive: bool, has_negative: bool, level: str) -> bool:
    if has_positive and has_negative:
        return False
    missing = "defective" if not has_positive else "normal"
    warnings.warn(f"No {missing} {level}s: {level} metrics are undefined (NaN).", RuntimeWarning, stacklevel=3)
    return True
