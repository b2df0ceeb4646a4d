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

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig

from .errors import ZSADError
from .images import load_image, to_pixel_values
from .loading import load_backbone, load_model
from .modeling.clip_backbone import CLIPBackbone
from .modeling.configuration_zsad_base import DEFAULT_CLIP
from .modeling.modeling_zsad_base import ZSADPreTrainedModel
from .modeling.prompting import clean_class_name
from .visualize import overlay_heatmap

DEFAULT_THRESHOLD = 0.5
# Details entries with more values than this (maps, features) are left out of the human-readable details.
MAX_DETAIL_VALUES = 16


class BackboneLoadError(ZSADError):
    """The CLIP backbone could not be loaded (offline without a cached copy, or a wrong id or path)."""

    def __init__(self, clip: str, message: str):
        super().__init__(message)
        self.clip = clip


@dataclass
class Detection:
    """What ``AnomalyDetector.detect`` returns for one image and one method.

    Args:
        method: the method name the detector holds the model under.
        status: "trained", "untrained" (a method at its training-free start) or "training-free" (the baseline).
        class_name: the cleaned class name the prompts used.
        score: image anomaly score in [0, 1].
        threshold: the threshold for both the pixel mask and the verdict.
        anomaly_map: (H, W) float32 map in [0, 1] at the original image's size.
        mask: (H, W) bool, ``anomaly_map >= threshold``.
        overlay: the heat map blended over the (upright, RGB) image.
        details: method-specific small values (e.g. GenCLIP's class-name-filtering decision).
        seconds: wall time of this detection, preprocessing and post-processing included.
    """

    method: str
    status: str
    class_name: str
    score: float
    threshold: float
    anomaly_map: np.ndarray
    mask: np.ndarray
    overlay: Image.Image
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def is_anomalous(self) -> bool:
        return self.score >= self.threshold

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"

    def mask_image(self) -> Image.Image:
        """The binary mask as a black/white 8-bit image."""
        return Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L")

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
            "details": self.details,
            "seconds": self.seconds,
        }


def model_status(model: ZSADPreTrainedModel) -> str:
    """"trained", "untrained" (trainable parts at their training-free start) or "training-free" (none)."""
    if model.config.is_trained:
        return "trained"
    return "untrained" if model.adapter_parameters() else "training-free"


def method_name(model: ZSADPreTrainedModel) -> str:
    """The ``zsad.METHODS`` name of a model's class, e.g. "stackclip"."""
    from . import METHODS

    for name, model_class in METHODS.items():
        if isinstance(model, model_class):
            return name
    return model.config.model_type


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
    ) -> "AnomalyDetector":
        """Load the backbone once, then every method: from its checkpoint (path or Hub id) where one is
        given, else untrained on the backbone. ``methods`` defaults to all of ``zsad.METHODS``.

        Without ``clip``, the backbone is the one the first checkpoint was trained on (or the default CLIP).
        ``image_size`` overrides the input size of untrained models only (checkpoints keep theirs).
        """
        from . import METHODS

        checkpoints = {name: path for name, path in (checkpoints or {}).items() if path}
        unknown = sorted(set(checkpoints) - set(METHODS))
        if unknown:
            raise ZSADError(f"Checkpoints were given for unknown methods {unknown}; known methods: {sorted(METHODS)}.")
        backbone = _shared_backbone(clip, checkpoints.values(), dtype)
        detector = cls(backbone)
        for name in methods or list(METHODS):
            detector.add(name, _load_method(name, checkpoints.get(name), backbone, image_size))
        return detector

    @classmethod
    def for_model(
        cls, model: str, clip: str | CLIPBackbone | None = None, dtype: torch.dtype | None = None, image_size: int | None = None
    ) -> "AnomalyDetector":
        """A detector holding one model: a method name (untrained) or a checkpoint's path / Hub id."""
        from . import METHODS

        if model in METHODS:
            return cls.load(methods=[model], clip=clip, dtype=dtype, image_size=image_size)
        if image_size:
            raise ZSADError("An image size can be set only for untrained models; a checkpoint keeps the size it was trained at.")
        method = checkpoint_method(model)
        return cls.load(methods=[method], checkpoints={method: model}, clip=clip, dtype=dtype)

    def add(self, name: str, model: ZSADPreTrainedModel) -> None:
        """Hold ``model`` under ``name``; it must run on this detector's backbone."""
        if model.clip is not self.backbone:
            model.attach_backbone(self.backbone)
        self.models[name] = model.eval()

    @property
    def method_names(self) -> list[str]:
        return list(self.models)

    def status(self, method: str) -> str:
        return model_status(self.model(method))

    def model(self, method: str) -> ZSADPreTrainedModel:
        if method not in self.models:
            raise ZSADError(f"Unknown method '{method}'; this detector holds {self.method_names}.")
        return self.models[method]

    def detect(self, image, class_name: str, method: str | None = None, threshold: float = DEFAULT_THRESHOLD) -> Detection:
        """Score one image (path, bytes, PIL image or array) of a product called ``class_name``."""
        return self.detect_batch([image], class_name, method=method, threshold=threshold)[0]

    def compare(self, image, class_name: str, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Detection]:
        """Every held method on the same image (read once; one vision pass for methods of equal input size)."""
        image = load_image(image)
        with self.backbone.reusing_image_features():
            return {name: self.detect(image, class_name, method=name, threshold=threshold) for name in self.models}

    def detect_batch(
        self, images: Sequence, class_names: str | Sequence[str], method: str | None = None, threshold: float = DEFAULT_THRESHOLD
    ) -> list[Detection]:
        """One forward pass for a batch of images; ``class_names`` is one name for all or one per image.

        ``method`` may be left out when the detector holds a single model.
        """
        started = time.perf_counter()
        method = self._resolve_method(method)
        model = self.model(method)
        _check_threshold(threshold)
        pictures = [load_image(image) for image in images]
        if not pictures:
            raise ZSADError("No images were given.")
        names = list(class_names) if isinstance(class_names, (list, tuple)) else [class_names] * len(pictures)
        if len(names) != len(pictures):
            raise ZSADError(f"Got {len(names)} class names for {len(pictures)} images; pass one name per image or one for all.")
        names = [clean_class_name(name) for name in names]
        pixel_values = to_pixel_values(pictures, model.config.image_size, self.backbone.image_mean, self.backbone.image_std)
        with torch.inference_mode():
            output = model(pixel_values, class_names=names)
            maps = [_resize_map(output.anomaly_map[i], picture.size) for i, picture in enumerate(pictures)]
        seconds = (time.perf_counter() - started) / len(pictures)
        status = model_status(model)
        return [
            Detection(
                method=method,
                status=status,
                class_name=names[i],
                score=float(output.image_score[i]),
                threshold=float(threshold),
                anomaly_map=maps[i],
                mask=maps[i] >= threshold,
                overlay=overlay_heatmap(pictures[i], maps[i]),
                details=readable_details(output.details, i, len(pictures)),
                seconds=seconds,
            )
            for i in range(len(pictures))
        ]

    def _resolve_method(self, method: str | None) -> str:
        if method is not None:
            return method
        if len(self.models) != 1:
            raise ZSADError(f"Say which method to use; this detector holds {self.method_names}.")
        return self.method_names[0]


def _load_method(name: str, checkpoint: str | None, backbone: CLIPBackbone, image_size: int | None) -> ZSADPreTrainedModel:
    if checkpoint is None:
        overrides = {"image_size": image_size} if image_size else {}
        return load_model(name, backbone=backbone, **overrides)
    model = load_model(checkpoint, backbone=backbone)
    if method_name(model) != name:
        raise ZSADError(f"The checkpoint '{checkpoint}' holds a {method_name(model)} model, not a {name} model.")
    return model


def checkpoint_method(checkpoint: str) -> str:
    """The ``zsad.METHODS`` name of the model a checkpoint holds."""
    from . import METHODS

    model_type = checkpoint_config(checkpoint).model_type
    for name, model_class in METHODS.items():
        if model_class.config_class.model_type == model_type:
            return name
    raise ZSADError(f"The checkpoint '{checkpoint}' holds a '{model_type}' model, which is not one of {sorted(METHODS)}.")


def _shared_backbone(clip, checkpoints, dtype) -> CLIPBackbone:
    if isinstance(clip, CLIPBackbone):
        return clip
    name, revision = (clip, None) if clip else checkpoint_backbone(checkpoints)
    try:
        return load_backbone(name, revision=revision, dtype=dtype)
    except ZSADError as error:
        raise BackboneLoadError(name or DEFAULT_CLIP, str(error)) from error


def checkpoint_backbone(checkpoints) -> tuple[str | None, str | None]:
    """(name, revision) of the CLIP the first checkpoint was trained on, (None, None) without checkpoints."""
    for checkpoint in checkpoints:
        config = checkpoint_config(checkpoint)
        return config.base_model_name_or_path, config.base_model_revision
    return None, None


def checkpoint_config(checkpoint: str):
    """A checkpoint's config alone (no weights, no backbone)."""
    try:
        return AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError) as error:
        raise ZSADError(
            f"Could not read the config of the checkpoint '{checkpoint}': {error}\n"
            "Check the path or Hub id (a folder written by save_pretrained has a config.json)."
        ) from error


def _check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ZSADError(f"The threshold must be a number between 0 and 1, got {threshold!r}.")


def _resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(S, S) map -> (H, W) float32 numpy map for an image of PIL ``size`` (W, H), bilinear."""
    width, height = size
    resized = F.interpolate(anomaly_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp_(0.0, 1.0).cpu().numpy()


def readable_details(details: dict | None, index: int, batch_size: int) -> dict:
    """Image ``index``'s part of a model's ``details``: strings, numbers and short lists, as plain Python.

    Per-image entries (a list or tensor with one entry per image) are indexed; large tensors (maps) are dropped.
    """
    readable = {}
    for key, value in (details or {}).items():
        if isinstance(value, torch.Tensor):
            if value.numel() > MAX_DETAIL_VALUES * max(batch_size, 1):
                continue
            value = value.detach().float().cpu().tolist()
        if isinstance(value, dict):
            value = readable_details(value, index, batch_size)
        elif isinstance(value, (list, tuple)) and len(value) == batch_size:
            value = value[index]
        if value is not None and _is_small_plain(value):
            readable[key] = _rounded(value)
    return readable


def _rounded(value):
    """Floats to 4 decimals, so details read well in a UI or a JSON file."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def _is_small_plain(value) -> bool:
    if isinstance(value, (str, bool, int, float)) or value is None:
        return True
    if isinstance(value, dict):
        return bool(value)
    if isinstance(value, (list, tuple)):
        return len(value) <= MAX_DETAIL_VALUES and all(_is_small_plain(item) for item in value)
    return False


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(sources: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files (by suffix, sorted) inside any folder among them."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files.extend(sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(source)
    return files


def predict_files(
    detector: AnomalyDetector,
    images: Sequence[str | Path],
    class_name: str,
    out_dir: str | Path,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
) -> dict:
    """Overlays and masks as PNGs plus ``scores.json`` in ``out_dir``, in batches with a progress bar.

    Unreadable images are recorded with their error and skipped; the returned dict is what ``scores.json`` holds.
    """
    if batch_size < 1:
        raise ZSADError(f"The batch size must be at least 1, got {batch_size}.")
    _check_threshold(threshold)
    class_name = clean_class_name(class_name)
    paths = image_files(images)
    if not paths:
        raise ZSADError("No image files were given (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ").")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _output_names(paths)
    records = []
    with tqdm(total=len(paths), unit="image", desc="zsad predict") as progress:
        for start in range(0, len(paths), batch_size):
            chunk = list(zip(paths[start : start + batch_size], names[start : start + batch_size]))
            records.extend(_predict_chunk(detector, chunk, class_name, out_dir, threshold))
            progress.update(len(chunk))
    method = detector.method_names[0]
    summary = {"method": method, "status": detector.status(method), "class_name": class_name, "threshold": threshold, "images": records}
    (out_dir / "scores.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _output_names(paths: list[Path]) -> list[str]:
    """File stems, made unique with a counter where two inputs share one (``a/x.png``, ``b/x.png``)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return names


def _predict_chunk(detector: AnomalyDetector, chunk, class_name: str, out_dir: Path, threshold: float) -> list[dict]:
    """One batch; records in input order, unreadable images recorded with their error."""
    pictures, errors = {}, {}
    for index, (path, _) in enumerate(chunk):
        try:
            pictures[index] = load_image(path)
        except ZSADError as error:
            errors[index] = str(error)
    results = dict(zip(pictures, detector.detect_batch(list(pictures.values()), class_name, threshold=threshold))) if pictures else {}
    records = []
    for index, (path, name) in enumerate(chunk):
        if index in errors:
            records.append({"image": str(path), "error": errors[index]})
            continue
        results[index].overlay.save(out_dir / f"{name}_overlay.png")
        results[index].mask_image().save(out_dir / f"{name}_mask.png")
        records.append({"image": str(path), "overlay": f"{name}_overlay.png", "mask": f"{name}_mask.png", **_image_summary(results[index])})
    return records


def _image_summary(result: Detection) -> dict:
    summary = result.summary()
    return {key: summary[key] for key in ("score", "verdict", "anomalous_pixel_fraction", "details", "seconds")}
