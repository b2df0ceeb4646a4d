"""Straightforward reference metrics for tests and benchmarks/bench_metrics.py (not part of the package).

AUPRO as in the MVTec-AD evaluation code's definition: at each threshold, binarise every map, take the mean
overlap fraction over all ground-truth connected components (PRO) and the false-positive rate over all normal
pixels, then integrate PRO over FPR up to ``max_fpr`` (linear interpolation at the limit), divided by it.
"""

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def reference_aupro(masks, maps, thresholds=None, max_fpr=0.3) -> float:
    """Per-threshold loop; ``thresholds`` default to every distinct score (exact), e.g. 200 evenly spaced ones
    for large inputs as in AnomalyCLIP / APRIL-GAN."""
    if thresholds is None:
        thresholds = np.unique(np.concatenate([np.ravel(m) for m in maps]))
    regions = []
    for index, mask in enumerate(masks):
        labels, count = ndimage.label(mask)
        regions += [(index, labels == region) for region in range(1, count + 1)]
    num_normal = sum(int((~np.asarray(mask, bool)).sum()) for mask in masks)
    fprs, pros = [0.0], [0.0]
    for threshold in sorted(thresholds, reverse=True):
        predictions = [m >= threshold for m in maps]
        pros.append(np.mean([predictions[index][region].mean() for index, region in regions]))
        false_positives = sum(int((p & ~np.asarray(mask, bool)).sum()) for p, mask in zip(predictions, masks))
        fprs.append(false_positives / num_normal)
    return _area_to(np.array(fprs), np.array(pros), max_fpr) / max_fpr


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    inside = x <= limit
    xs, ys = list(x[inside]), list(y[inside])
    if not inside.all():
        first_out = int(np.argmax(~inside))
        x0, x1, y0, y1 = x[first_out - 1], x[first_out], y[first_out - 1], y[first_out]
        xs.append(limit)
        ys.append(y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.trapezoid(ys, xs))


def reference_pixel_metrics(masks, maps, thresholds=None, max_fpr=0.3) -> dict[str, float]:
    """scikit-learn on the flattened pixels plus ``reference_aupro``."""
    labels = np.concatenate([np.ravel(m) for m in masks]).astype(bool)
    scores = np.concatenate([np.ravel(m) for m in maps]).astype(np.float64)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    return {"pixel_auroc": roc_auc_score(labels, scores), "pixel_ap": average_precision_score(labels, scores),
            "pixel_f1_max": float(f1.max()), "pixel_aupro": reference_aupro(masks, maps, thresholds, max_fpr)}
