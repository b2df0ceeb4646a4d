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
from .images import image_files, load_image
from .modeling.clip_backbone import ImageFeatures
from .modeling.modeling_zsad_base import ZSADPreTrainedModel
from .profile import DEFAULT_MARGIN, DEFAULT_QUANTILE, ProductProfile, calibrate, check_quantile, choose_weight
from .references import (
    FusionScale,
    ReferenceMemory,
    ReferenceScores,
    SourceMaps,
    default_weight,
    leave_one_out_sources,
    reference_sources,
)


def build_profile(detector, method: str | None, class_name: str, normal_images, defective_images=None, masks=None, *,
                  quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN, fusion_weight: float | None = None,
                  batch_size: int = 8, progress: bool = False) -> ProductProfile:
    """A ``ProductProfile`` of ``detector``'s ``method`` for the product ``class_name`` from images of good parts
    (paths, PIL images, arrays or folders; K >= 1) and, optionally, of defective parts with their masks (a folder
    matched by file name, ``000.png`` <- ``000.png`` or ``000_mask.png``, or one mask per defective image in order).

    The good images are the references; each is scored against the others (leave-one-out, K >= 2) to calibrate
    the thresholds: ``quantile`` of the good scores plus ``margin`` with good images only, F1-max with defective
    images. Both maps are put on the good images' leave-one-out scale before fusing (``FusionScale``);
    ``fusion_weight`` is the reference map's share, by default chosen on the defective images (pixel F1-max with
    masks, image F1-max without), else 1 for an untrained model and 0.5 for a trained one.
    """
    method = detector.resolve_method(method)
    return build_profiles(detector, [method], class_name, normal_images, defective_images, masks, quantile=quantile, margin=margin,
                          fusion_weight=fusion_weight, batch_size=batch_size, progress=progress)[method]


def build_profiles(detector, methods: Sequence[str], class_name: str, normal_images, defective_images=None, masks=None, *,
                   quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN, fusion_weight: float | None = None,
                   batch_size: int = 8, progress: bool = False) -> dict[str, ProductProfile]:
    """``build_profile`` for several methods, encoding each image once per input size (as ``compare`` does)."""
    check_quantile(quantile, margin)
    if fusion_weight is not None and not 0.0 <= fusion_weight <= 1.0:
        raise ZSADError(f"The fusion weight must be between 0 and 1, got {fusion_weight}.")
    name = detector.product_name(class_name, methods)
    normal = read_images(normal_images, "good")
    defective = read_images(defective_images, "defective") if defective_images is not None else []
    defective_masks = read_masks(masks, defective_images, len(defective)) if masks is not None else None
    passes = detector.vision_passes(methods)
    encoded = {}
    with tqdm(total=(len(normal) + len(defective)) * len(passes), unit="image", desc="encoding reference images",
              disable=not progress) as bar:
        for key, streams in passes.items():
            encoded[key] = (_encode_batches(detector, normal, key, streams, batch_size, bar),
                            _encode_batches(detector, defective, key, streams, batch_size, bar))
    profiles = {}
    memories: dict[tuple, ReferenceMemory] = {}  # methods tapping the same layers and stream of one input size share one memory
    for method in tqdm(methods, unit="method", desc="calibrating thresholds (leave-one-out)", disable=not progress):
        model = detector.model(method)
        encoded_normal, encoded_defective = encoded[model.config.vision_pass]
        profiles[method] = _profile(model, method, name, encoded_normal, encoded_defective, defective_masks, quantile, margin,
                                    fusion_weight, memories)
    return profiles


def _encode_batches(detector, pictures: list[Image.Image], vision_pass: tuple, streams: dict, batch_size: int, bar) -> list[dict]:
    batches = []
    for start in range(0, len(pictures), batch_size):
        batches.append(detector.encode(pictures[start:start + batch_size], vision_pass, streams))
        bar.update(len(pictures[start:start + batch_size]))
    return batches


def _profile(model: ZSADPreTrainedModel, method: str, name: str, normal: list[dict], defective: list[dict], masks,
             quantile: float, margin: float, fusion_weight: float | None, memories: dict[tuple, ReferenceMemory]) -> ProductProfile:
    start, layers = model.config.vv_attention_from, model.config.feature_layers
    normal = [model.features_from_streams(batch) for batch in normal]
    defective = [model.features_from_streams(batch) for batch in defective]
    key = (*model.config.vision_pass, tuple(layers), start)
    if key not in memories:
        memories[key] = ReferenceMemory.concatenate([ReferenceMemory.from_features(batch) for batch in normal])
    memory = memories[key]
    weight = default_weight(model.config.is_trained) if fusion_weight is None else fusion_weight
    profile = ProductProfile(method, name, memory, None, model.config.base_model_name_or_path, model.config.base_model_revision,
                             FusionScale(weight), backbone_hub_id=model.config.backbone_hub_id)
    if memory.num_images < 2:
        return profile
    good = leave_one_out_sources(model, memory, normal, name)
    bad = [_sources(model, name, batch, memory) for batch in defective]
    masks = [resized_mask(mask, model.config.image_size) for mask in masks] if masks else None
    map_weight = model.config.image_score_map_weight
    profile.fusion = FusionScale.from_good(good, weight)
    if fusion_weight is None and bad:
        profile.fusion = profile.fusion.with_weight(choose_weight(profile.fusion, good, bad, masks, map_weight))
    good = [profile.fusion.fuse(sources, map_weight) for sources in good]
    bad = [profile.fusion.fuse(sources, map_weight) for sources in bad]
    profile.calibration = calibrate(
        [s for scores in good for s in scores.image_score.tolist()], _maps(good), [s for scores in bad for s in scores.image_score.tolist()],
        _maps(bad), masks, quantile, margin,
        reference_mean_distance=float(max(d for scores in good for d in scores.mean_distance.tolist())),
    )
    return profile


def _sources(model: ZSADPreTrainedModel, class_name: str, features: ImageFeatures, memory: ReferenceMemory) -> SourceMaps:
    with torch.inference_mode():
        output = model(image_features=features, class_names=[class_name] * features.batch_size)
        return reference_sources(memory, features, output.anomaly_map, output.global_score, model.config)


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
