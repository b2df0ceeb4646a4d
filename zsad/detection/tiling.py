"""Full-resolution detection in overlapping windows of the model's input size (small defects on large images).

```python
>>> from zsad.detection.tiling import detect_tiled
>>> result = detect_tiled(detector, "wafer.png", "wafer", method="stackclip")   # or detector.detect_tiled(...)
>>> result.tiles, result.anomaly_map.shape                                       # windows scored, (H, W) of the file
```
"""

import math
import time
from collections.abc import Callable

import numpy as np

from ..modeling.exceptions import ZSADError
from ..modeling.image_processing_zsad import resize_map
from ..runtime.images import read_image
from ..runtime.methods import status
from .results import Detection, build_detection, check_optional_threshold, thresholds


def tile_boxes(size: tuple[int, int], tile: int, overlap: float = 0.25) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of ``tile`` x ``tile`` windows covering an image of PIL ``size`` (W, H), spread
    evenly with neighbours overlapping by at least ``overlap`` of a window; a side shorter than a window gets one
    window of its whole length."""
    if not 0.0 <= overlap < 1.0:
        raise ZSADError(f"The tile overlap must be in [0, 1), got {overlap}.")

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        count = math.ceil((length - tile) / (tile * (1.0 - overlap))) + 1
        return [round(i * (length - tile) / (count - 1)) for i in range(count)]

    width, height = size
    return [(left, top, min(left + tile, width), min(top + tile, height)) for top in starts(height) for left in starts(width)]


def detect_tiled(detector, image, class_name: str, method: str | None = None, threshold: float | None = None,
                 overlap: float = 0.25, batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                 profile=None) -> Detection:
    """Score ``image`` at full resolution with ``detector``'s ``method``: the windows (``tile_boxes``) run in batches
    of ``batch_size`` through the detector's one route (vision pass, heads, ``profile``'s references when given),
    their maps are averaged where they overlap, and the image score is the highest window score. ``threshold``
    follows the one rule (``zsad.detection.results.thresholds``: given, else the profile's, else 0.5); ``progress(done,
    total)`` is called after each batch."""
    started = time.perf_counter()
    method = detector.resolve_method(method)
    model = detector.model(method)
    check_optional_threshold(threshold)
    loaded = read_image(image)
    picture, name = loaded.image, detector.product_name(class_name, method)
    processor = detector.image_processor(model.config.image_size)
    boxes = tile_boxes(picture.size, processor.size, overlap)
    total = np.zeros((picture.height, picture.width), dtype=np.float32)
    counts = np.zeros_like(total)
    best_score, best_details = -1.0, None
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        features = detector.model_features(model, [picture.crop(box) for box in chunk])
        output, result = detector.run_heads(method, features, [name] * len(chunk), profile)
        maps, scores = result.anomaly_map.float().cpu().numpy(), result.image_score.float().cpu().tolist()
        for i, (left, top, right, bottom) in enumerate(chunk):
            total[top:bottom, left:right] += resize_map(maps[i], (right - left, bottom - top))
            counts[top:bottom, left:right] += 1.0
            if scores[i] > best_score:
                best_score, best_details = scores[i], output.image_details(i)
        if progress is not None:
            progress(min(start + batch_size, len(boxes)), len(boxes))
    return build_detection(method=method, status=status(model), class_name=name, score=best_score, picture=picture,
                           thresholds=thresholds(threshold, profile.calibration if profile else None), anomaly_map=total / counts,
                           details=best_details, seconds=time.perf_counter() - started, original_size=loaded.original_size,
                           tiles=len(boxes), references=profile.num_references if profile else 0)
