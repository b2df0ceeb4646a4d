"""From a user's image and product name to a score, a verdict, a map at the image's own size and an overlay.

One frozen CLIP backbone is loaded once and shared by every method model the detector holds:

```python
>>> from zsad.inference import AnomalyDetector
>>> detector = AnomalyDetector.load(checkpoints={"stackclip": "user/zsad-stackclip"})  # others untrained
>>> result = detector.detect("part.png", "metal nut", method="stackclip", threshold=0.5)
>>> result.score, result.verdict, result.anomaly_map.shape   # (H, W) of part.png
>>> result.overlay.save("part_overlay.png")
>>> results = detector.compare("part.png", "metal nut")      # every method on the same image
```
"""

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import BackboneLoadError, ZSADError
from .images import LoadedImage, read_image, to_pixel_values
from .loading import checkpoint_method, load_method, resolve_device, shared_backbone
from .methods import METHODS, status
from .modeling.clip_backbone import CLIPBackbone
from .modeling.modeling_zsad_base import ZSADPreTrainedModel
from .modeling.prompting import clean_class_name
from .visualize import overlay_heatmap

DEFAULT_THRESHOLD = 0.5

__all__ = ["DEFAULT_THRESHOLD", "AnomalyDetector", "BackboneLoadError", "Detection"]


@dataclass
class Detection:
    """What ``AnomalyDetector.detect`` returns for one image and one method.

    Args:
        method: the method name the detector holds the model under.
        status: "trained", "untrained" (a method at its training-free start) or "training-free" (the baseline).
        class_name: the cleaned class name the prompts used.
        score: image anomaly score in [0, 1].
        threshold: the threshold for both the pixel mask and the verdict.
        anomaly_map: (H, W) float32 map in [0, 1] at the size of the image as read: the original image's size,
            or, when ``display_side`` was passed to ``detect``, that image scaled so that its longest side is at
            most ``display_side`` (``full_resolution_map()`` gives the map at the original size then).
        mask: (H, W) bool, ``anomaly_map >= threshold``.
        overlay: the heat map blended over the (upright, RGB) image, at the size of ``anomaly_map``.
        details: the method's own parts for this image, a dataclass (``StackCLIPImageDetails``,
            ``GenCLIPImageDetails`` with its class-name-filter decision) or None (the baseline).
        seconds: wall time of this detection, preprocessing and post-processing included.
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
    original_size: tuple[int, int] | None = None
    model_map: np.ndarray | None = None
    tiles: int = 0

    @property
    def is_anomalous(self) -> bool:
        return self.score >= self.threshold

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"

    def mask_image(self) -> Image.Image:
        """The binary mask as a black/white 8-bit image."""
        return Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L")

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

    def model(self, method: str) -> ZSADPreTrainedModel:
        if method not in self.models:
            raise ZSADError(f"Unknown method '{method}'; this detector holds {self.method_names}.")
        return self.models[method]

    def detect(self, image, class_name: str, method: str | None = None, threshold: float = DEFAULT_THRESHOLD,
               display_side: int | None = None) -> Detection:
        """Score one image (path, bytes, PIL image or array) of a product called ``class_name``.

        With ``display_side``, the image is read with its longest side at most that many pixels (large JPEGs are
        decoded at reduced size) and the map, mask and overlay come at that size: the model sees its input size
        either way, and camera-size images cost about what small ones do."""
        return self.detect_batch([image], class_name, method=method, threshold=threshold, display_side=display_side)[0]

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

    def compare(self, image, class_name: str, threshold: float = DEFAULT_THRESHOLD, display_side: int | None = None) -> dict[str, Detection]:
        """Every held method on the same image: read once, one vision pass per input size (with every layer any
        of those methods taps), passed to each model as ``image_features``. ``display_side`` as in ``detect``."""
        started = time.perf_counter()
        loaded = read_image(image, max_side=display_side)
        picture = loaded.image
        check_threshold(threshold)
        name = clean_class_name(class_name)
        shared = {}
        for size, layers in self._layers_by_image_size().items():
            pixel_values = to_pixel_values([picture], size, self.backbone.image_mean, self.backbone.image_std)
            with torch.inference_mode():
                shared[size] = self.backbone.encode_image(pixel_values, layers)
        shared_seconds = time.perf_counter() - started
        results = {}
        for method, model in self.models.items():
            results[method] = self._detect_on_features(method, shared[model.config.image_size], [loaded], [name], threshold,
                                                       time.perf_counter())[0]
        # The shared reading and vision pass are counted once, with the first method.
        first = next(iter(results.values()))
        first.seconds += shared_seconds
        return results

    def _layers_by_image_size(self) -> dict[int, list[int]]:
        layers: dict[int, set[int]] = {}
        for model in self.models.values():
            layers.setdefault(model.config.image_size, set()).update(model.config.feature_layers)
        return {size: sorted(tapped) for size, tapped in layers.items()}

    def detect_batch(
        self, images: Sequence, class_names: str | Sequence[str], method: str | None = None, threshold: float = DEFAULT_THRESHOLD,
        display_side: int | None = None,
    ) -> list[Detection]:
        """One forward pass for a batch of images; ``class_names`` is one name for all or one per image.

        ``method`` may be left out when the detector holds a single model; ``display_side`` as in ``detect``.
        """
        started = time.perf_counter()
        method = self._resolve_method(method)
        model = self.model(method)
        check_threshold(threshold)
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
        return self._detect_on_features(method, features, loaded, names, threshold, started)

    def _detect_on_features(self, method: str, features, loaded: list[LoadedImage], names: list[str], threshold: float,
                            started: float) -> list[Detection]:
        """The model's heads on an encoded batch, then maps, masks and overlays at each image's own size."""
        model = self.model(method)
        pictures = [item.image for item in loaded]
        with torch.inference_mode():
            output = model(image_features=features, class_names=names)
            maps = [resize_map(output.anomaly_map[i], picture.size) for i, picture in enumerate(pictures)]
            model_maps = output.anomaly_map.float().cpu().numpy()
        seconds = (time.perf_counter() - started) / len(pictures)
        return [
            Detection(
                method=method,
                status=status(model),
                class_name=names[i],
                score=float(output.image_score[i]),
                threshold=float(threshold),
                anomaly_map=maps[i],
                mask=maps[i] >= threshold,
                overlay=overlay_heatmap(pictures[i], maps[i]),
                details=output.image_details(i),
                seconds=seconds,
                original_size=loaded[i].original_size,
                model_map=model_maps[i],
            )
            for i in range(len(pictures))
        ]

    def _resolve_method(self, method: str | None) -> str:
        if method is not None:
            return method
        if len(self.models) != 1:
            raise ZSADError(f"Say which method to use; this detector holds {self.method_names}.")
        return self.method_names[0]


def check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ZSADError(f"The threshold must be a number between 0 and 1, got {threshold!r}.")


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


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(S, S) map -> (H, W) float32 numpy map for an image of PIL ``size`` (W, H), bilinear."""
    width, height = size
    resized = F.interpolate(anomaly_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp_(0.0, 1.0).cpu().numpy()
