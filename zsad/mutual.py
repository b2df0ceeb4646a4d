"""Zero-shot from the batch itself: mutual scoring of unlabeled images of one product (MuSc, Li et al., ICLR 2024;
docs/METHODS.md, "Mutual scoring"), as ``Detection``s. The arithmetic is ``zsad.modeling.mutual_scoring`` (torch
only, shared with the checkpoints' pipeline); its names are public here too.

```python
>>> from zsad.mutual import MutualSettings, detect_mutual, mutual_scores
>>> results = detect_mutual(detector, ["lot/001.png", "lot/002.png", ...], "metal nut")  # one Detection per image
>>> results[0].details.compared_with, results[0].score, results[0].anomaly_map.shape
>>> scores = mutual_scores([tokens_1, tokens_2, ...], MutualSettings(max_compared=16))  # (L, P, D) per image
>>> scores.patch_maps    # (N, P) mean distance to the closest images' nearest patches
```
"""

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from .detection import MUTUAL_CALIBRATION, Detection, build_detection, thresholds
from .images import read_image
from .methods import status
from .modeling.mutual_scoring import (
    MutualBatch,
    MutualScores,
    MutualSettings,
    aggregate,
    check_batch,
    comparison_groups,
    content_key,
    default_text_weight,
    far_notes,
    fused,
    map_image_scores,
    mutual_map,
    mutual_scores,
    rescore,
    score_batch,
    standardise,
    to_unit,
)
from .references import reference_map

__all__ = ["MutualBatch", "MutualDetails", "MutualScores", "MutualSettings", "aggregate", "check_batch", "comparison_groups",
           "content_key", "detect_mutual", "far_notes", "fused", "map_image_scores", "mutual_map", "mutual_scores", "rescore",
           "score_batch", "standardise", "to_unit"]


@dataclass
class MutualDetails:
    """A mutual detection's own parts: how many images it was compared with, its median nearest-patch distance
    (how much it looks like the others), the weights of the fused sources and the method's own details."""

    compared_with: int
    median_distance: float
    text_weight: float
    reference_weight: float
    method: Any = None


def detect_mutual(detector, images: Sequence, class_name: str, method: str = "baseline", threshold: float | None = None,
                  profile=None, settings: MutualSettings = MutualSettings(), batch_size: int = 8,
                  display_side: int | None = None, progress: bool = False,
                  turn: Callable[[], AbstractContextManager] = nullcontext) -> list[Detection]:
    """Score ``images`` (paths, PIL images, arrays; N >= 2, one product, any sizes) against each other with
    ``detector``'s backbone, at ``method``'s input size and tapped layers; one ``Detection`` per image, maps at each
    image's size as ``detect`` returns them. The mutual map is fused with the method's text map (``text_weight``) and
    with a ``profile``'s reference map when given, each standardised over the batch first. Maps and scores are on the
    batch's scale: 0.5 is ``settings.offset`` robust standard deviations above the batch's typical pixel / image, the
    verdict threshold unless ``threshold`` is given. Each image is encoded once; groups of at most
    ``settings.max_compared + 1`` images are encoded and scored one after another, so memory follows the cap. Each
    encoding batch and each group's scoring runs inside ``turn()`` (a server's turn on the model, e.g. the Space's)."""
    started = time.perf_counter()
    model = detector.model(method)
    loaded = [read_image(image, max_side=display_side) for image in images]
    keys = [content_key(item.image) for item in loaded]
    check_batch(keys)
    name = detector.product_name(class_name, method)
    text_weight = default_text_weight(settings, status(model) == "trained")
    reference = None
    if profile is not None:
        profile.check_compatible(method, name, model.config)

        def reference(features, sigma):
            return reference_map(profile.memory.to(features.image_embeds.device, features.layer_tokens[0].dtype), features, sigma)

    batch = score_batch(model, [item.image for item in loaded], keys, name, text_weight, settings, batch_size, progress, turn,
                        reference)
    image_threshold, pixel_threshold, calibration = thresholds(threshold, None)
    chosen = (image_threshold, pixel_threshold, f"{MUTUAL_CALIBRATION}{calibration}")
    seconds = (time.perf_counter() - started) / len(loaded)
    detections = [
        build_detection(
            method=method, status=status(model), class_name=name, score=float(batch.scores[i]), picture=item.image,
            thresholds=chosen, model_map=batch.maps[i].numpy(),
            details=MutualDetails(int(batch.compared[i]), round(float(batch.median_distance[i]), 4), text_weight,
                                  settings.reference_weight if profile is not None else 0.0, batch.method_details[i]),
            seconds=seconds, references=profile.num_references if profile is not None else 0, note=batch.notes[i],
            original_size=item.original_size,
        )
        for i, item in enumerate(loaded)
    ]
    return detections
