"""A product profile from images of good parts (and optionally defective ones with masks): the references' patch
memory and thresholds calibrated by scoring each reference against the others (leave-one-out).

```python
>>> from zsad.calibration import build_profile
>>> profile = build_profile(detector, "stackclip", "metal nut", "good_parts/")   # or detector.build_profile(...)
>>> profile.calibration.image_threshold, profile.describe()
```
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.model_input import resized_mask
from .errors import ZSADError
from .fusion import scored
from .images import image_files, load_image
from .modeling.clip_backbone import ImageFeatures
from .modeling.modeling_zsad_base import ZSADPreTrainedModel
from .modeling.prompting import clean_class_name
from .profile import DEFAULT_FUSION_WEIGHT, DEFAULT_MARGIN, DEFAULT_QUANTILE, ProductProfile, calibrate, check_quantile
from .references import ReferenceMemory, ReferenceScores, single_image


def build_profile(detector, method: str | None, class_name: str, normal_images, defective_images=None, masks=None, *,
                  quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN, fusion_weight: float = DEFAULT_FUSION_WEIGHT,
                  batch_size: int = 8, progress: bool = False) -> ProductProfile:
    """A ``ProductProfile`` of ``detector``'s ``method`` for the product ``class_name`` from images of good parts
    (paths, PIL images, arrays or folders; K >= 1) and, optionally, of defective parts with their masks (a folder
    matched by file name, ``000.png`` <- ``000.png`` or ``000_mask.png``, or one mask per defective image in order).

    The good images are the references; each is scored against the others (leave-one-out, K >= 2) to calibrate
    the thresholds: ``quantile`` of the good scores plus ``margin`` with good images only, F1-max with defective
    images. ``fusion_weight`` is the reference map's share in the fused map and score.
    """
    method = detector.resolve_method(method)
    return build_profiles(detector, [method], class_name, normal_images, defective_images, masks, quantile=quantile, margin=margin,
                          fusion_weight=fusion_weight, batch_size=batch_size, progress=progress)[method]


def build_profiles(detector, methods: Sequence[str], class_name: str, normal_images, defective_images=None, masks=None, *,
                   quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN, fusion_weight: float = DEFAULT_FUSION_WEIGHT,
                   batch_size: int = 8, progress: bool = False) -> dict[str, ProductProfile]:
    """``build_profile`` for several methods, encoding each image once per input size (as ``compare`` does)."""
    check_quantile(quantile, margin)
    if not 0.0 <= fusion_weight <= 1.0:
        raise ZSADError(f"The fusion weight must be between 0 and 1, got {fusion_weight}.")
    name = clean_class_name(class_name)
    normal = read_images(normal_images, "good")
    defective = read_images(defective_images, "defective") if defective_images is not None else []
    defective_masks = read_masks(masks, defective_images, len(defective)) if masks is not None else None
    by_size = detector.layers_by_image_size(methods)
    encoded = {}
    with tqdm(total=(len(normal) + len(defective)) * len(by_size), unit="image", desc="encoding reference images",
              disable=not progress) as bar:
        for size, layers in by_size.items():
            encoded[size] = (_encode_batches(detector, normal, size, layers, batch_size, bar),
                             _encode_batches(detector, defective, size, layers, batch_size, bar))
    profiles = {}
    memories: dict[tuple, ReferenceMemory] = {}  # methods tapping the same layers of one input size share one memory
    for method in tqdm(methods, unit="method", desc="calibrating thresholds (leave-one-out)", disable=not progress):
        model = detector.model(method)
        encoded_normal, encoded_defective = encoded[model.config.image_size]
        profiles[method] = _profile(model, method, name, encoded_normal, encoded_defective, defective_masks, quantile, margin,
                                    fusion_weight, memories)
    return profiles


def _encode_batches(detector, pictures: list[Image.Image], size: int, layers: list[int], batch_size: int, bar) -> list[ImageFeatures]:
    batches = []
    for start in range(0, len(pictures), batch_size):
        batches.append(detector.encode(pictures[start:start + batch_size], size, layers))
        bar.update(len(batches[-1].image_embeds))
    return batches


def _profile(model: ZSADPreTrainedModel, method: str, name: str, normal: list[ImageFeatures], defective: list[ImageFeatures], masks,
             quantile: float, margin: float, fusion_weight: float, memories: dict[tuple, ReferenceMemory]) -> ProductProfile:
    normal = [batch.select(model.config.feature_layers) for batch in normal]
    key = (model.config.image_size, tuple(model.config.feature_layers))
    if key not in memories:
        memories[key] = ReferenceMemory.concatenate([ReferenceMemory.from_features(batch) for batch in normal])
    memory = memories[key]
    profile = ProductProfile(method, name, memory, None, model.config.base_model_name_or_path,
                             model.config.base_model_revision, fusion_weight)
    if memory.num_images < 2:
        return profile
    good = _leave_one_out(model, profile, normal)
    bad = [_fused(model, profile, batch.select(model.config.feature_layers), memory) for batch in defective]
    size = model.config.image_size
    profile.calibration = calibrate(
        [s for scores in good for s in scores.image_score.tolist()], _maps(good), [s for scores in bad for s in scores.image_score.tolist()],
        _maps(bad), [resized_mask(mask, size) for mask in masks] if masks else None, quantile, margin,
        reference_mean_distance=float(max(d for scores in good for d in scores.mean_distance.tolist())),
    )
    return profile


def _fused(model: ZSADPreTrainedModel, profile: ProductProfile, features: ImageFeatures, memory: ReferenceMemory) -> ReferenceScores:
    with torch.inference_mode():
        return scored(model, features, [profile.class_name] * features.batch_size, memory, profile.fusion_weight)[1]


def _leave_one_out(model: ZSADPreTrainedModel, profile: ProductProfile, batches: list[ImageFeatures]) -> list[ReferenceScores]:
    """Each reference scored against the others, never itself."""
    results, index = [], 0
    for batch in batches:
        for i in range(batch.batch_size):
            results.append(_fused(model, profile, single_image(batch, i), profile.memory.leave_out(index)))
            index += 1
    return results


def read_images(sources, kind: str) -> list[Image.Image]:
    """Images from a path, PIL image or array, a folder, or a list of them (folders searched for image files)."""
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    expanded = []
    for item in items:
        expanded.extend(image_files([item]) if isinstance(item, (str, Path)) else [item])
    if not expanded:
        raise ZSADError(f"No {kind} images were given (folders are searched for image files); pass at least one.")
    return [load_image(item) for item in expanded]


def read_masks(masks, defective_images, count: int) -> list[np.ndarray]:
    """One boolean mask per defective image: from a folder (matched by file name) or a list in the same order."""
    if isinstance(masks, (str, Path)) and Path(masks).is_dir():
        sources = image_files(defective_images if isinstance(defective_images, (list, tuple)) else [defective_images])
        index = {path.stem: path for path in image_files([masks])}
        missing = [path.name for path in sources if path.stem not in index and f"{path.stem}_mask" not in index]
        if missing:
            raise ZSADError(f"No mask in {masks} for the defective images {missing[:5]}; name masks like the images "
                            "(000.png or 000_mask.png).")
        masks = [index.get(path.stem) or index[f"{path.stem}_mask"] for path in sources]
    masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if len(masks) != count:
        raise ZSADError(f"Got {len(masks)} masks for {count} defective images; pass one mask per defective image.")
    return [np.asarray(load_image(mask).convert("L")) > 127 for mask in masks]


def _maps(scores: list[ReferenceScores]) -> list[np.ndarray]:
    return [m.cpu().numpy() for batch in scores for m in batch.anomaly_map.float()]
