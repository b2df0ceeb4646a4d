"""Exact anomaly-detection metrics: image AUROC / AP / F1-max and pixel AUROC / AP / F1-max / AUPRO.

```python
>>> from zsad.metrics import image_metrics, pixel_metrics
>>> image_metrics(labels=[0, 0, 1, 1], scores=[0.1, 0.4, 0.35, 0.8])
{'image_auroc': 0.75, 'image_ap': 0.833..., 'image_f1_max': 0.8}
>>> pixel_metrics(masks, maps)   # lists of (H, W) arrays, sizes may differ between images
{'pixel_auroc': ..., 'pixel_ap': ..., 'pixel_f1_max': ..., 'pixel_aupro': ...}
```

Pixel metrics are exact (every distinct score is a threshold, ties handled as scikit-learn does), computed
from one pass over the maps: each score gets an ordinal key, and per key we count normal pixels, defect pixels
and the PRO weight ``1 / (number of regions * region size)`` of each defect pixel (ground-truth connected
components labelled once). Reverse cumulative sums of these histograms give TPR, FPR, precision and the
per-region overlap (PRO) at every threshold. float16 maps get their key from the bit pattern in O(N) (65,536
possible values), which keeps a whole benchmark's maps small and the metrics fast; other dtypes are ranked
with ``np.unique``. Degenerate inputs (one class only, no defect region) give NaN with a warning.
The same counts give the plotted pixel ROC and precision-recall points (``ThresholdCurve.curves``): exact, one
point per distinct score, so at most 65,536 for float16 maps however many pixels there are.
"""

import warnings
from collections.abc import Iterable, Sequence
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
    """Cumulative counts at every distinct score, from the highest score down (threshold = score >= t)."""

    def __init__(self, negative_hist: np.ndarray, positive_hist: np.ndarray, pro_hist: np.ndarray, num_regions: int):
        used = (negative_hist + positive_hist) > 0
        self.fp = np.cumsum(negative_hist[used][::-1])
        self.tp = np.cumsum(positive_hist[used][::-1])
        self.pro = np.cumsum(pro_hist[used][::-1]) / max(num_regions, 1)
        self.negatives = int(self.fp[-1]) if self.fp.size else 0
        self.positives = int(self.tp[-1]) if self.tp.size else 0

    @classmethod
    def from_maps(cls, masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> "ThresholdCurve":
        keys, num_keys = _ordinal_keys(maps)
        negative = np.zeros(num_keys, dtype=np.int64)
        positive = np.zeros(num_keys, dtype=np.int64)
        pro = np.zeros(num_keys, dtype=np.float64)
        num_regions = 0
        for mask, key in zip(masks, keys):  # image by image: temporaries stay the size of one map
            mask = np.asarray(mask, dtype=bool)
            regions, count = ndimage.label(mask)  # 4-connected ground-truth regions, as in the MVTec-AD code
            mask, key = mask.ravel(), key.ravel()
            negative += np.bincount(key[~mask], minlength=num_keys)
            positive += np.bincount(key[mask], minlength=num_keys)
            if count:
                region_of_pixel = regions.ravel()[mask]
                weights = 1.0 / np.bincount(region_of_pixel)[region_of_pixel]
                pro += np.bincount(key[mask], weights=weights, minlength=num_keys)
                num_regions += count
        return cls(negative, positive, pro, num_regions)

    def curves(self) -> Curves | None:
        """ROC and precision-recall points at every distinct score (exact); None if only one class."""
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


def _ordinal_keys(maps: Sequence[np.ndarray]) -> tuple[Iterable[np.ndarray], int]:
    """Integer keys per map, ordered like the scores (equal scores, equal keys), and the number of keys.
    float16 keys are made one map at a time (lazily), so only one map's keys exist at once."""
    if all(np.asarray(m).dtype == np.float16 for m in maps):
        return (_float16_key(np.asarray(m)) for m in maps), FLOAT16_KEYS
    flat = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    values, inverse = np.unique(flat, return_inverse=True)
    bounds = np.cumsum([np.size(m) for m in maps])[:-1]
    return [part.reshape(np.shape(m)) for part, m in zip(np.split(inverse, bounds), maps)], values.size


def _float16_key(scores: np.ndarray) -> np.ndarray:
    """Monotone map of float16 values to 0..65535 via the bit pattern (IEEE sign-magnitude order)."""
    bits = (scores + np.float16(0)).view(np.uint16)  # + 0 turns -0 into +0, so the two zeros share a key
    return np.where(bits & 0x8000, ~bits, bits | 0x8000).astype(np.int32)


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
