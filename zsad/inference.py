"""From a user's image and product name to a score, a verdict, a map at the image's own size and an overlay.

One frozen CLIP backbone is loaded once and shared by every method model the detector holds:

```python
>>> from zsad.inference import AnomalyDetector
>>> detector = AnomalyDetector.load(checkpoints={"stackclip": "user/zsad-stackclip"})  # others untrained
>>> result = detector.detect("part.png", "metal nut", method="stackclip", threshold=0.5)
>>> result.score, result.verdict, result.anomaly_map.shape   # (H, W) of part.png
>>> result.overlay.save("part_overlay.png")
>>> results = detector.compare("part.png", "metal nut")      # every method on the same image
>>> profile = detector.build_profile("stackclip", "metal nut", "good_parts/")   # reference images, calibration
>>> detector.detect("part.png", "metal nut", method="stackclip", profile=profile).summary()["calibration"]
'calibrated on 8 good images'
```
"""

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.model_input import resized_mask
from .errors import BackboneLoadError, ZSADError
from .images import LoadedImage, image_files, read_image
from .loading import checkpoint_method, load_method, resolve_device, shared_backbone
from .methods import METHODS, status
from .modeling.clip_backbone import CLIPBackbone, ImageFeatures
from .modeling.image_processing_zsad import (
    DEFAULT_THRESHOLD,
    check_threshold,
    load_image,
    mask_image,
    resize_map,
    to_pixel_values,
    verdict,
)
from .modeling.modeling_zsad_base import ZSADPreTrainedModel
from .modeling.prompting import clean_class_name
from .profile import DEFAULT_MARGIN, DEFAULT_QUANTILE, ProductProfile, calibrate, check_quantile, choose_weight, uncalibrated_description
from .references import (
    FusionScale,
    ReferenceMemory,
    ReferenceScores,
    SourceMaps,
    apply_references,
    default_weight,
    leave_one_out_sources,
    reference_sources,
)
from .visualize import overlay_heatmap

__all__ = ["DEFAULT_THRESHOLD", "AnomalyDetector", "BackboneLoadError", "Detection", "check_threshold"]


@dataclass
class Detection:
    """What ``AnomalyDetector.detect`` returns for one image and one method.

    Args:
        method: the method name the detector holds the model under.
        status: "trained", "untrained" (a method at its training-free start) or "training-free" (the baseline).
        class_name: the cleaned class name the prompts used.
        score: image anomaly score in [0, 1] (fused with the reference images' when a profile is used).
        threshold: the verdict's threshold (and the mask's, unless ``pixel_threshold`` is set).
        anomaly_map: (H, W) float32 map in [0, 1] at the size of the image as read: the original image's size,
            or, when ``display_side`` was passed to ``detect``, that image scaled so that its longest side is at
            most ``display_side`` (``full_resolution_map()`` gives the map at the original size then).
        mask: (H, W) bool, ``anomaly_map >= pixel_threshold``.
        overlay: the heat map blended over the (upright, RGB) image, at the size of ``anomaly_map``.
        details: the method's own parts for this image, a dataclass (``StackCLIPImageDetails``,
            ``GenCLIPImageDetails`` with its class-name-filter decision) or None (the baseline).
        seconds: wall time of this detection, preprocessing and post-processing included.
        pixel_threshold: the mask's threshold when it differs from the verdict's (a calibrated profile); else None.
        calibration: where the thresholds come from: "calibrated on N good (+ M defective) images" or
            "uncalibrated (threshold 0.5)".
        references: how many reference images of good parts were used (0: zero-shot).
        note: a warning about this image, e.g. that it does not look like the reference images.
        original_size: (width, height) of the upright original image.
        model_map: (S, S) float32 map at the model's input size (None for tiled detections, whose
            ``anomaly_map`` is already at the original size).
        tiles: how many windows a tiled detection (``detect_tiled``) scored; 0 for a whole-image detection.
    """

    method: str
    status: str
    class_name: str
    score: float
    threshold: float
    anomaly_map: np.ndarray
    mask: np.ndarray
    overlay: Image.Image
    details: Any = None
    seconds: float = 0.0
    pixel_threshold: float | None = None
    calibration: str = uncalibrated_description(DEFAULT_THRESHOLD)
    references: int = 0
    note: str | None = None
    original_size: tuple[int, int] | None = None
    model_map: np.ndarray | None = None
    tiles: int = 0

    @property
    def is_anomalous(self) -> bool:
        return self.score >= self.threshold

    @property
    def verdict(self) -> str:
        return verdict(self.score, self.threshold)

    @property
    def mask_threshold(self) -> float:
        return self.threshold if self.pixel_threshold is None else self.pixel_threshold

    def mask_image(self) -> Image.Image:
        """The binary mask as a black/white 8-bit image."""
        return mask_image(self.mask)

    def full_resolution_map(self) -> np.ndarray:
        """(H, W) map at the original image's size (``anomaly_map`` itself when it already is)."""
        width, height = self.original_size or (self.anomaly_map.shape[1], self.anomaly_map.shape[0])
        if self.anomaly_map.shape == (height, width) or self.model_map is None:
            return self.anomaly_map
        return resize_map(torch.from_numpy(self.model_map), (width, height))

    def summary(self) -> dict:
        """JSON-ready numbers and words (no arrays)."""
        return {
            "method": self.method,
            "status": self.status,
            "class_name": self.class_name,
            "score": self.score,
            "verdict": self.verdict,
            "threshold": self.threshold,
            "pixel_threshold": self.mask_threshold,
            "calibration": self.calibration,
            "references": self.references,
            "note": self.note,
            "anomalous_pixel_fraction": float(self.mask.mean()),
            "details": self.details_dict(),
            "seconds": self.seconds,
            "tiles": self.tiles,
        }

    def details_dict(self) -> dict:
        """``details`` as plain JSON values, floats rounded to 4 decimals ({} for a method without details)."""
        return _rounded(dataclasses.asdict(self.details)) if self.details is not None else {}


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


class AnomalyDetector:
    """Holds one shared backbone and any number of method models by name; does pre- and post-processing."""

    def __init__(self, backbone: CLIPBackbone, models: Mapping[str, ZSADPreTrainedModel] | None = None):
        self.backbone = backbone
        self.models: dict[str, ZSADPreTrainedModel] = {}
        for name, model in (models or {}).items():
            self.add(name, model)

    @classmethod
    def load(
        cls,
        methods: Sequence[str] | None = None,
        checkpoints: Mapping[str, str | None] | None = None,
        clip: str | CLIPBackbone | None = None,
        dtype: torch.dtype | None = None,
        image_size: int | None = None,
        device: str | torch.device | None = "auto",
    ) -> "AnomalyDetector":
        """Load the backbone once, then every method: from its checkpoint (path or Hub id) where one is
        given, else untrained on the backbone. ``methods`` defaults to all of ``zsad.METHODS``.

        Without ``clip``, the backbone is the one the first checkpoint was trained on (or the default CLIP).
        ``image_size`` overrides the input size of untrained models only (checkpoints keep theirs).
        ``device`` ("auto": CUDA when available, see ``zsad.loading.resolve_device``) is where the backbone and
        every model run; ``dtype`` is the vision tower's precision (``zsad.loading.resolve_precision`` picks one
        for a device).
        """
        checkpoints = {name: path for name, path in (checkpoints or {}).items() if path}
        unknown = sorted(set(checkpoints) - set(METHODS))
        if unknown:
            raise ZSADError(f"Checkpoints were given for unknown methods {unknown}; known methods: {sorted(METHODS)}.")
        device = resolve_device(device)
        backbone = shared_backbone(clip, checkpoints.values(), dtype).to(device)
        detector = cls(backbone)
        for name in methods or list(METHODS):
            detector.add(name, load_method(name, checkpoints.get(name), backbone, image_size))
        return detector

    @classmethod
    def for_model(
        cls, model: str, clip: str | CLIPBackbone | None = None, dtype: torch.dtype | None = None, image_size: int | None = None,
        device: str | torch.device | None = "auto",
    ) -> "AnomalyDetector":
        """A detector holding one model: a method name (untrained) or a checkpoint's path / Hub id."""
        if model in METHODS:
            return cls.load(methods=[model], clip=clip, dtype=dtype, image_size=image_size, device=device)
        if image_size:
            raise ZSADError("An image size can be set only for untrained models; a checkpoint keeps the size it was trained at.")
        method = checkpoint_method(model)
        return cls.load(methods=[method], checkpoints={method: model}, clip=clip, dtype=dtype, device=device)

    def add(self, name: str, model: ZSADPreTrainedModel) -> None:
        """Hold ``model`` under ``name``; it must run on this detector's backbone."""
        if model.clip is not self.backbone:
            model.attach_backbone(self.backbone)
        self.models[name] = model.eval()

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def method_names(self) -> list[str]:
        return list(self.models)

    def status(self, method: str) -> str:
        return status(self.model(method))

    def verdict_thresholds(self, class_name: str, threshold: float | None = None, profile: ProductProfile | None = None) -> tuple[float, float, str]:
        """(image threshold, pixel threshold, where they come from): ``threshold``, else the profile's, else 0.5."""
        return thresholds(threshold, profile)

    def model(self, method: str) -> ZSADPreTrainedModel:
        if method not in self.models:
            raise ZSADError(f"Unknown method '{method}'; this detector holds {self.method_names}.")
        return self.models[method]

    def detect(self, image, class_name: str, method: str | None = None, threshold: float | None = None,
               profile: ProductProfile | None = None, display_side: int | None = None) -> Detection:
        """Score one image (path, bytes, PIL image or array) of a product called ``class_name``.

        ``profile`` (from ``build_profile`` or ``ProductProfile.load``) adds its reference images and, unless a
        ``threshold`` is given, its calibrated thresholds; without either the threshold is 0.5. With ``display_side``,
        the image is read with its longest side at most that many pixels (large JPEGs are decoded at reduced size) and
        the map, mask and overlay come at that size: the model sees its input size either way, and camera-size images
        cost about what small ones do.
        """
        return self.detect_batch([image], class_name, method=method, threshold=threshold, profile=profile,
                                 display_side=display_side)[0]

    def detect_tiled(self, image, class_name: str, method: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                     overlap: float = 0.25, batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> Detection:
        """Score ``image`` at full resolution in overlapping windows of the model's input size (small defects on
        large images): the windows run in batches of ``batch_size``, their maps are averaged where they overlap,
        and the image score is the highest window score. ``progress(done, total)`` is called after each batch."""
        started = time.perf_counter()
        method = self._resolve_method(method)
        model = self.model(method)
        check_threshold(threshold)
        loaded = read_image(image)
        picture, name, size = loaded.image, clean_class_name(class_name), model.config.image_size
        boxes = tile_boxes(picture.size, size, overlap)
        total = np.zeros((picture.height, picture.width), dtype=np.float32)
        counts = np.zeros_like(total)
        best_score, best_details = -1.0, None
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start : start + batch_size]
            pixel_values = to_pixel_values([picture.crop(box) for box in chunk], size, self.backbone.image_mean, self.backbone.image_std)
            with torch.inference_mode():
                output = model(pixel_values, class_names=[name] * len(chunk))
            for i, (left, top, right, bottom) in enumerate(chunk):
                total[top:bottom, left:right] += resize_map(output.anomaly_map[i], (right - left, bottom - top))
                counts[top:bottom, left:right] += 1.0
                if float(output.image_score[i]) > best_score:
                    best_score, best_details = float(output.image_score[i]), output.image_details(i)
            if progress is not None:
                progress(min(start + batch_size, len(boxes)), len(boxes))
        anomaly_map = total / counts
        return Detection(method=method, status=status(model), class_name=name, score=best_score, threshold=float(threshold),
                         anomaly_map=anomaly_map, mask=anomaly_map >= threshold, overlay=overlay_heatmap(picture, anomaly_map),
                         details=best_details, seconds=time.perf_counter() - started, original_size=loaded.original_size,
                         tiles=len(boxes))

    def compare(self, image, class_name: str, threshold: float | None = None,
                profiles: Mapping[str, ProductProfile] | None = None, display_side: int | None = None) -> dict[str, Detection]:
        """Every held method on the same image: read once, one vision pass per input size (with every layer any
        of those methods taps), passed to each model as ``image_features``; ``profiles`` by method name,
        ``display_side`` as in ``detect``."""
        started = time.perf_counter()
        loaded = read_image(image, max_side=display_side)
        picture = loaded.image
        check_optional_threshold(threshold)
        name = clean_class_name(class_name)
        shared = {size: self._encode([picture], size, streams) for size, streams in self._layers_by_image_size().items()}
        shared_seconds = time.perf_counter() - started
        results = {}
        for method, model in self.models.items():
            features = shared[model.config.image_size][model.config.vv_attention_from]
            results[method] = self._detect_on_features(method, features, [loaded], [name], threshold,
                                                       time.perf_counter(), (profiles or {}).get(method))[0]
        # The shared reading and vision pass are counted once, with the first method.
        first = next(iter(results.values()))
        first.seconds += shared_seconds
        return results

    def _encode(self, pictures: list[Image.Image], size: int, streams: dict) -> dict:
        pixel_values = to_pixel_values(pictures, size, self.backbone.image_mean, self.backbone.image_std)
        with torch.inference_mode():
            return self.backbone.encode_image_streams(pixel_values, streams)

    def _layers_by_image_size(self, methods: Sequence[str] | None = None) -> dict[int, dict]:
        """{input size: {vv_attention_from: layers}}: one vision pass per size, one stream per value-value start."""
        layers: dict[int, dict] = {}
        for method in methods or self.method_names:
            config = self.model(method).config
            layers.setdefault(config.image_size, {}).setdefault(config.vv_attention_from, set()).update(config.feature_layers)
        return {size: {start: sorted(tapped) for start, tapped in streams.items()} for size, streams in layers.items()}

    def detect_batch(
        self, images: Sequence, class_names: str | Sequence[str], method: str | None = None, threshold: float | None = None,
        profile: ProductProfile | None = None, display_side: int | None = None,
    ) -> list[Detection]:
        """One forward pass for a batch of images; ``class_names`` is one name for all or one per image.

        ``method`` may be left out when the detector holds a single model; ``display_side`` as in ``detect``.
        """
        started = time.perf_counter()
        method = self._resolve_method(method)
        model = self.model(method)
        check_optional_threshold(threshold)
        loaded = [read_image(image, max_side=display_side) for image in images]
        pictures = [item.image for item in loaded]
        if not pictures:
            raise ZSADError("No images were given.")
        names = list(class_names) if isinstance(class_names, (list, tuple)) else [class_names] * len(pictures)
        if len(names) != len(pictures):
            raise ZSADError(f"Got {len(names)} class names for {len(pictures)} images; pass one name per image or one for all.")
        names = [clean_class_name(name) for name in names]
        pixel_values = to_pixel_values(pictures, model.config.image_size, self.backbone.image_mean, self.backbone.image_std)
        with torch.inference_mode():
            features = model.encode_image(pixel_values)
        return self._detect_on_features(method, features, loaded, names, threshold, started, profile)

    def _detect_on_features(self, method: str, features, loaded: list[LoadedImage], names: list[str], threshold: float | None,
                            started: float, profile: ProductProfile | None = None) -> list[Detection]:
        """The model's heads on an encoded batch (fused with the profile's references), then maps, masks and overlays
        at each image's own size."""
        model = self.model(method)
        pictures = [item.image for item in loaded]
        for name in sorted(set(names)) if profile else ():
            profile.check_compatible(method, name, model.config)
        with torch.inference_mode():
            output = model(image_features=features, class_names=names)
            fused = self._with_references(model, profile, features, output.anomaly_map, output.global_score) if profile else None
            anomaly_maps, scores = (fused.anomaly_map, fused.image_score) if fused else (output.anomaly_map, output.image_score)
            maps = [resize_map(anomaly_maps[i], picture.size) for i, picture in enumerate(pictures)]
            model_maps = anomaly_maps.float().cpu().numpy()
        image_threshold, pixel_threshold, calibration = thresholds(threshold, profile)
        seconds = (time.perf_counter() - started) / len(pictures)
        return [
            Detection(
                method=method,
                status=status(model),
                class_name=names[i],
                score=float(scores[i]),
                threshold=image_threshold,
                anomaly_map=maps[i],
                mask=maps[i] >= pixel_threshold,
                overlay=overlay_heatmap(pictures[i], maps[i]),
                details=output.image_details(i),
                seconds=seconds,
                pixel_threshold=pixel_threshold if pixel_threshold != image_threshold else None,
                calibration=calibration,
                references=profile.num_references if profile else 0,
                note=profile.mismatch_note(float(fused.mean_distance[i])) if fused else None,
                original_size=loaded[i].original_size,
                model_map=model_maps[i],
            )
            for i in range(len(pictures))
        ]

    def _with_references(self, model: ZSADPreTrainedModel, profile: ProductProfile, features: ImageFeatures,
                         anomaly_map: torch.Tensor, global_score: torch.Tensor) -> ReferenceScores:
        """Maps and scores fused with the profile's references on the profile's scale."""
        memory = profile.memory
        return apply_references(memory, features.select(memory.layers, memory.vv_attention_from), anomaly_map, global_score,
                                profile.fusion, model.config)

    # ----- product profiles -----------------------------------------------------------------------------

    def build_profile(self, method: str | None, class_name: str, normal_images, defective_images=None, masks=None, *,
                      quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN,
                      fusion_weight: float | None = None, batch_size: int = 8, progress: bool = False) -> ProductProfile:
        """A ``ProductProfile`` of ``method`` for the product ``class_name`` from images of good parts (paths, PIL images,
        arrays or folders; K >= 1) and, optionally, of defective parts with their masks (a folder matched by file name,
        ``000.png`` <- ``000.png`` or ``000_mask.png``, or one mask per defective image in order).

        The good images are the references; each is scored against the others (leave-one-out, K >= 2) to calibrate
        the thresholds: ``quantile`` of the good scores plus ``margin`` with good images only, F1-max with defective
        images. Both maps are put on the good images' leave-one-out scale before fusing (``FusionScale``);
        ``fusion_weight`` is the reference map's share, by default chosen on the defective images (pixel F1-max with
        masks, image F1-max without), else 1 for an untrained model and 0.5 for a trained one.
        """
        method = self._resolve_method(method)
        return self.build_profiles([method], class_name, normal_images, defective_images, masks, quantile=quantile, margin=margin,
                                   fusion_weight=fusion_weight, batch_size=batch_size, progress=progress)[method]

    def build_profiles(self, methods: Sequence[str], class_name: str, normal_images, defective_images=None, masks=None, *,
                       quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN,
                       fusion_weight: float | None = None, batch_size: int = 8,
                       progress: bool = False) -> dict[str, ProductProfile]:
        """``build_profile`` for several methods, encoding each image once per input size (as ``compare`` does)."""
        check_quantile(quantile, margin)
        if fusion_weight is not None and not 0.0 <= fusion_weight <= 1.0:
            raise ZSADError(f"The fusion weight must be between 0 and 1, got {fusion_weight}.")
        name = clean_class_name(class_name)
        normal = read_images(normal_images, "good")
        defective = read_images(defective_images, "defective") if defective_images is not None else []
        defective_masks = read_masks(masks, defective_images, len(defective)) if masks is not None else None
        profiles = {}
        with tqdm(total=len(normal) + len(defective), unit="image", desc="zsad calibrate", disable=not progress) as bar:
            for size, streams in self._layers_by_image_size(methods).items():
                encoded_normal = self._encode_batches(normal, size, streams, batch_size, bar)
                encoded_defective = self._encode_batches(defective, size, streams, batch_size, bar)
                memories: dict[tuple, ReferenceMemory] = {}  # methods tapping the same layers share one memory
                for method in (m for m in methods if self.model(m).config.image_size == size):
                    profiles[method] = self._profile(method, name, encoded_normal, encoded_defective, defective_masks,
                                                     quantile, margin, fusion_weight, memories)
        return profiles

    def _encode_batches(self, pictures: list[Image.Image], size: int, streams: dict, batch_size: int, bar) -> list[dict]:
        batches = []
        for start in range(0, len(pictures), batch_size):
            batches.append(self._encode(pictures[start:start + batch_size], size, streams))
            bar.update(len(pictures[start:start + batch_size]))
        return batches

    def _profile(self, method: str, name: str, normal: list[dict], defective: list[dict], masks,
                 quantile: float, margin: float, fusion_weight: float | None, memories: dict[tuple, ReferenceMemory]) -> ProductProfile:
        model = self.model(method)
        start = model.config.vv_attention_from
        normal = [batch[start].select(model.config.feature_layers, start) for batch in normal]
        defective = [batch[start] for batch in defective]
        layers = (tuple(model.config.feature_layers), start)
        if layers not in memories:
            memories[layers] = ReferenceMemory.concatenate([ReferenceMemory.from_features(batch) for batch in normal])
        memory = memories[layers]
        weight = default_weight(model.config.is_trained) if fusion_weight is None else fusion_weight
        profile = ProductProfile(method, name, memory, None, model.config.base_model_name_or_path,
                                 model.config.base_model_revision, FusionScale(weight))
        if memory.num_images < 2:
            return profile
        good = leave_one_out_sources(model, memory, normal, name)
        bad = [self._sources(model, profile, batch.select(model.config.feature_layers, start), memory) for batch in defective]
        size = model.config.image_size
        masks = [resized_mask(mask, size) for mask in masks] if masks else None
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

    def _sources(self, model: ZSADPreTrainedModel, profile: ProductProfile, features: ImageFeatures,
                 memory: ReferenceMemory) -> SourceMaps:
        with torch.inference_mode():
            output = model(image_features=features, class_names=[profile.class_name] * features.batch_size)
            return reference_sources(memory, features, output.anomaly_map, output.global_score, model.config)

    def _resolve_method(self, method: str | None) -> str:
        if method is not None:
            return method
        if len(self.models) != 1:
            raise ZSADError(f"Say which method to use; this detector holds {self.method_names}.")
        return self.method_names[0]


def thresholds(threshold: float | None, profile: ProductProfile | None) -> tuple[float, float, str]:
    """(image threshold, pixel threshold, where they come from): a given threshold for both, else the profile's
    calibrated thresholds, else 0.5."""
    calibration = profile.calibration if profile else None
    if threshold is None and calibration is not None:
        return calibration.image_threshold, calibration.pixel_threshold, calibration.describe()
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if calibration is not None:
        return threshold, threshold, f"{calibration.describe()}; threshold {threshold:g} set by hand"
    return threshold, threshold, uncalibrated_description(threshold)


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


def check_optional_threshold(threshold: float | None) -> None:
    if threshold is not None:
        check_threshold(threshold)


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
