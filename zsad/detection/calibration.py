"""A product profile from images of good parts (and optionally defective ones with masks): the references' patch
memory and thresholds calibrated by scoring each reference against the others (leave-one-out).

```python
>>> from zsad.detection.calibration import build_profile
>>> profile = build_profile(detector, "stackclip", "metal nut", "good_parts/")   # or detector.build_profile(...)
>>> profile.calibration.image_threshold, profile.describe()
```
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.model_input import resized_mask
from ..modeling.clip_backbone import ImageFeatures
from ..modeling.exceptions import ZSADError
from ..modeling.modeling_zsad_base import ZSADPreTrainedModel
from ..runtime.images import image_files, load_image
from ..runtime.noise import bar_disable
from .conformal import reachable_rank
from .profile import DEFAULT_MARGIN, DEFAULT_QUANTILE, ProductProfile, calibrate, check_quantile, choose_weight
from .references import (
    FusionScale,
    MethodOutputs,
    ReferenceMemory,
    ReferenceScores,
    SourceMaps,
    default_weight,
    memory_leave_one_out,
    method_outputs,
    reference_sources,
)
from .results import thresholds


def build_profile(detector, method: str | None, class_name: str, normal_images, defective_images=None, masks=None, *,
                  quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN, fusion_weight: float | None = None,
                  false_alarm_rate: float | None = None, allow_higher_rate: bool = False, batch_size: int = 8,
                  progress: bool = False) -> ProductProfile:
    """A ``ProductProfile`` of ``detector``'s ``method`` for the product ``class_name`` from images of good parts
    (paths, PIL images, arrays or folders; K >= 1) and, optionally, of defective parts with their masks (a folder
    matched by file name, ``000.png`` <- ``000.png`` or ``000_mask.png``, or one mask per defective image in order).

    The good images are the references; each is scored against the others (leave-one-out, K >= 2) to calibrate
    the thresholds: with ``false_alarm_rate`` (ALPHA), the split-conformal threshold that flags at most ALPHA of new
    good parts (a ZSADError naming the number of good images needed when they are too few, unless
    ``allow_higher_rate`` accepts the best reachable rate 1 / (K + 1)); else ``quantile`` of the good scores plus
    ``margin`` with good images only, F1-max with defective images. Both maps are put on the good images'
    leave-one-out scale before fusing (``FusionScale``);
    ``fusion_weight`` is the reference map's share, by default chosen on the defective images (pixel F1-max with
    masks, image F1-max without), else 1 for an untrained model and 0.5 for a trained one.
    """
    method = detector.resolve_method(method)
    return build_profiles(detector, [method], class_name, normal_images, defective_images, masks, quantile=quantile, margin=margin,
                          fusion_weight=fusion_weight, false_alarm_rate=false_alarm_rate, allow_higher_rate=allow_higher_rate,
                          batch_size=batch_size, progress=progress)[method]


def build_profiles(detector, methods: Sequence[str], class_name: str, normal_images, defective_images=None, masks=None, *,
                   quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN, fusion_weight: float | None = None,
                   false_alarm_rate: float | None = None, allow_higher_rate: bool = False, batch_size: int = 8,
                   progress: bool = False) -> dict[str, ProductProfile]:
    """``build_profile`` for several methods, encoding each image once per input size (as ``compare`` does)."""
    check_quantile(quantile, margin)
    if fusion_weight is not None and not 0.0 <= fusion_weight <= 1.0:
        raise ZSADError(f"The fusion weight must be between 0 and 1, got {fusion_weight}.")
    name = detector.product_name(class_name, methods)
    normal = read_images(normal_images, "good")
    rule = ThresholdRule(quantile, margin, false_alarm_rate, allow_higher_rate)
    rule.check_reachable(len(normal))
    defective = read_images(defective_images, "defective") if defective_images is not None else []
    defective_masks = read_masks(masks, defective_images, len(defective)) if masks is not None else None
    passes = detector.vision_passes(methods)
    encoded = {}
    with tqdm(total=(len(normal) + len(defective)) * len(passes), unit="image", desc="encoding reference images",
              disable=bar_disable(progress)) as bar:
        for key, streams in passes.items():
            encoded[key] = (_encode_batches(detector, normal, key, streams, batch_size, bar),
                            _encode_batches(detector, defective, key, streams, batch_size, bar))
    profiles = {}
    memories: dict[tuple, ReferenceMemory] = {}  # methods tapping the same layers and stream of one input size share one memory
    for method in tqdm(methods, unit="method", desc="calibrating thresholds (leave-one-out)", disable=bar_disable(progress)):
        model = detector.model(method)
        encoded_normal, encoded_defective = encoded[model.config.vision_pass]
        profile = _profile(model, method, name, encoded_normal, encoded_defective, defective_masks, rule, fusion_weight, memories)
        profile.provenance = detector.provenance(method, class_name, name, thresholds(None, profile.calibration))
        profiles[method] = profile
    return profiles


@dataclass(frozen=True)
class ThresholdRule:
    """How calibration sets the thresholds from the good images (``zsad.detection.profile.calibrate``): the conformal rule for
    ``false_alarm_rate``, else ``quantile`` + ``margin`` (F1-max when defective images are given)."""

    quantile: float = DEFAULT_QUANTILE
    margin: float = DEFAULT_MARGIN
    false_alarm_rate: float | None = None
    allow_higher_rate: bool = False

    @classmethod
    def of(cls, calibration) -> "ThresholdRule":
        """The rule a profile's calibration was made with."""
        return cls(calibration.quantile, calibration.margin, calibration.false_alarm_target, calibration.allow_higher_rate)

    def check_reachable(self, num_good: int) -> None:
        """A ZSADError before any image is encoded when ``num_good`` images cannot reach the asked rate (and the
        higher rate is not accepted); leave-one-out calibration scores every good image, so n = ``num_good``."""
        if self.false_alarm_rate is not None:
            reachable_rank(num_good, self.false_alarm_rate, self.allow_higher_rate)

    def calibrate(self, good_scores, good_maps, defective_scores=(), defective_maps=(), masks=None, **kwargs):
        return calibrate(good_scores, good_maps, defective_scores, defective_maps, masks, self.quantile, self.margin,
                         false_alarm_rate=self.false_alarm_rate, allow_higher_rate=self.allow_higher_rate, **kwargs)


def add_references(detector, profile: ProductProfile, normal_images, *, false_alarm_rate: float | None = None,
                   allow_higher_rate: bool | None = None, batch_size: int = 8, progress: bool = False) -> ProductProfile:
    """``profile`` with more good images: the memory, leave-one-out scores, fusion scale and thresholds of all the
    references, old and new, equal to a profile built from all of them at once with the profile's fusion weight.

    The profile's own threshold rule is kept unless ``false_alarm_rate`` (and ``allow_higher_rate``) are given. A
    profile whose thresholds came from defective images (F1-max), or saved without its references' method outputs,
    is refused: neither can be recalibrated from what the profile holds.
    """
    calibration = profile.calibration
    if calibration is not None and calibration.rule == "F1-max":
        raise ZSADError("This profile's thresholds were chosen on defective images (F1-max), which a profile does not keep; "
                        "calibrate again from all the good images with --defective (or add references with a "
                        "--false-alarm-rate, which sets the thresholds from good images only).")
    if profile.outputs is None:
        raise ZSADError("This profile does not keep its references' own maps (it was saved by an older zsad); build it again "
                        "from all the good images with `zsad calibrate`.")
    model = detector.model(profile.method)
    profile.check_compatible(profile.method, profile.class_name, model.config)
    kept = ThresholdRule.of(calibration) if calibration is not None else ThresholdRule()
    if false_alarm_rate is not None:
        kept = ThresholdRule(kept.quantile, kept.margin, false_alarm_rate, kept.allow_higher_rate)
    if allow_higher_rate is not None:
        kept = ThresholdRule(kept.quantile, kept.margin, kept.false_alarm_rate, allow_higher_rate)
    added = read_images(normal_images, "good")
    kept.check_reachable(profile.num_references + len(added))
    vision_pass = model.config.vision_pass
    streams = detector.vision_passes([profile.method])[vision_pass]
    with tqdm(total=len(added), unit="image", desc="encoding added reference images", disable=bar_disable(progress)) as bar:
        batches = [model.features_from_streams(batch) for batch in _encode_batches(detector, added, vision_pass, streams, batch_size, bar)]
    new_memory = ReferenceMemory.concatenate([ReferenceMemory.from_features(batch) for batch in batches])
    memory = ReferenceMemory.concatenate([profile.memory, new_memory.to(profile.memory.features[0].device, profile.memory.dtype)])
    outputs = MethodOutputs.concatenate([profile.outputs, method_outputs(model, batches, profile.class_name)])
    updated = _calibrated_profile(model, profile.method, profile.class_name, memory, outputs, [], None, kept, profile.fusion.weight)
    updated.provenance = detector.provenance(profile.method, profile.class_name, profile.class_name, thresholds(None, updated.calibration))
    return updated


def _encode_batches(detector, pictures: list[Image.Image], vision_pass: tuple, streams: dict, batch_size: int, bar) -> list[dict]:
    batches = []
    for start in range(0, len(pictures), batch_size):
        batches.append(detector.encode(pictures[start:start + batch_size], vision_pass, streams))
        bar.update(len(pictures[start:start + batch_size]))
    return batches


def _profile(model: ZSADPreTrainedModel, method: str, name: str, normal: list[dict], defective: list[dict], masks,
             rule: ThresholdRule, fusion_weight: float | None, memories: dict[tuple, ReferenceMemory]) -> ProductProfile:
    start, layers = model.config.vv_attention_from, model.config.feature_layers
    normal = [model.features_from_streams(batch) for batch in normal]
    defective = [model.features_from_streams(batch) for batch in defective]
    key = (*model.config.vision_pass, tuple(layers), start)
    if key not in memories:
        memories[key] = ReferenceMemory.concatenate([ReferenceMemory.from_features(batch) for batch in normal])
    memory = memories[key]
    bad = [_sources(model, name, batch, memory) for batch in defective]
    return _calibrated_profile(model, method, name, memory, method_outputs(model, normal, name), bad, masks, rule, fusion_weight)


def _calibrated_profile(model: ZSADPreTrainedModel, method: str, name: str, memory: ReferenceMemory, outputs: MethodOutputs,
                        bad: list[SourceMaps], masks, rule: ThresholdRule, fusion_weight: float | None) -> ProductProfile:
    """The profile of ``memory`` and the references' own ``outputs``: leave-one-out scores from the memory alone, the
    fusion scale and weight, the thresholds (``bad``: the defective images' sources against the whole memory)."""
    weight = default_weight(model.config.is_trained) if fusion_weight is None else fusion_weight
    profile = ProductProfile(method, name, memory, None, model.config.base_model_name_or_path, model.config.base_model_revision,
                             FusionScale(weight), backbone_hub_id=model.config.backbone_hub_id,
                             outputs=MethodOutputs.concatenate([outputs]))
    if memory.num_images < 2:
        return profile
    good = memory_leave_one_out(memory, outputs, model.config)
    masks = [resized_mask(mask, model.config.image_size) for mask in masks] if masks else None
    map_weight = model.config.image_score_map_weight
    profile.fusion = FusionScale.from_good(good, weight)
    if fusion_weight is None and bad:
        profile.fusion = profile.fusion.with_weight(choose_weight(profile.fusion, good, bad, masks, map_weight))
    good = [profile.fusion.fuse(sources, map_weight) for sources in good]
    bad = [profile.fusion.fuse(sources, map_weight) for sources in bad]
    profile.calibration = rule.calibrate(
        [s for scores in good for s in scores.image_score.tolist()], _maps(good), [s for scores in bad for s in scores.image_score.tolist()],
        _maps(bad), masks, reference_mean_distance=float(max(d for scores in good for d in scores.mean_distance.tolist())),
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
