"""The one result type of zsad: what a detection returns for one image and one method, and the one threshold rule.

Built by ``build_detection`` from the map at the model's input size, whatever ran the model (``AnomalyDetector``,
tiled detection, an exported graph in ``zsad.deploy.runtime``). numpy and Pillow only: importing this module does not
import torch, so the torch-free runtime returns the same type.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..modeling.image_processing_zsad import DEFAULT_THRESHOLD, ZSADImageProcessor, check_threshold, mask_image, resize_map, verdict
from .visualize import overlay_heatmap

# How a mutual detection's calibration starts: its maps and scores are on its group's own scale.
MUTUAL_CALIBRATION = "mutual: scored against its group; "


class CalibratedThresholds(Protocol):
    """What the threshold rule reads of a product profile's calibration (``zsad.detection.profile.Calibration``)."""

    image_threshold: float
    pixel_threshold: float

    def describe(self) -> str: ...


# Statuses of a text method whose scores no data has set a scale for (zsad.methods.status).
UNSCALED_STATUSES = ("untrained", "training-free")
# Where an untrained or training-free text method's verdict would come from, said instead of a verdict.
NO_VERDICT_REASON = "no verdict: the default threshold means nothing for an untrained or training-free method"
NO_VERDICT_LINE = (f"{NO_VERDICT_REASON}. For a verdict, "
                   "calibrate on references of good parts (zsad calibrate, a profile), use a trained checkpoint, or set a "
                   "threshold (--threshold, threshold=)")
NO_VERDICT = "none"


def uncalibrated_description(threshold: float) -> str:
    return f"uncalibrated (threshold {threshold:g})"


# The rule of the default threshold: nobody chose it, so it gives a verdict only for a trained model.
DEFAULT_RULE = uncalibrated_description(DEFAULT_THRESHOLD)


def gives_verdict(status: str, calibration: str) -> bool:
    """Whether a threshold means something: set by hand, calibrated, mutual (on its group's scale), or the default one
    for a trained model."""
    return calibration != DEFAULT_RULE or status not in UNSCALED_STATUSES


def thresholds(threshold: float | None, calibration: CalibratedThresholds | None = None) -> tuple[float, float, str]:
    """(image threshold, pixel threshold, where they come from): a given ``threshold`` for both, else the
    calibration's thresholds, else 0.5 (``DEFAULT_RULE``: no verdict for an untrained or training-free method)."""
    if threshold is None and calibration is not None:
        return calibration.image_threshold, calibration.pixel_threshold, calibration.describe()
    if threshold is None:
        return DEFAULT_THRESHOLD, DEFAULT_THRESHOLD, DEFAULT_RULE
    threshold = float(threshold)
    if calibration is not None:
        return threshold, threshold, f"{calibration.describe()}; threshold {threshold:g} set by hand (the calibrated rate does not apply)"
    return threshold, threshold, f"uncalibrated (threshold {threshold:g} set by hand)"


def check_optional_threshold(threshold: float | None) -> None:
    if threshold is not None:
        check_threshold(threshold)


@dataclass
class Detection:
    """The result for one image and one method.

    Args:
        method: the method name the detector holds the model under.
        status: "trained", "untrained" (a method at its training-free start) or "training-free" (the baseline); for a
            graph run by ``zsad.deploy.runtime``, the status its export recorded.
        class_name: the cleaned class name the prompts used.
        score: image anomaly score in [0, 1] (fused with the reference images' when a profile is used).
        threshold: the verdict's threshold (the one applied; no verdict is given at the default threshold for an
            untrained or training-free method: ``verdict`` is "none", ``is_anomalous`` None).
        anomaly_map: (H, W) float32 map in [0, 1] at the size of the image as read: the original image's size,
            or, when ``display_side`` was passed to ``detect``, that image scaled so that its longest side is at
            most ``display_side`` (``full_resolution_map()`` gives the map at the original size then).
        mask: (H, W) bool, ``anomaly_map >= mask_threshold``.
        overlay: the heat map blended over the (upright, RGB) image, at the size of ``anomaly_map``.
        details: the method's own parts for this image, a dataclass (``StackCLIPImageDetails``,
            ``GenCLIPImageDetails`` with its class-name-filter decision) or None (the baseline, exported graphs).
        seconds: wall time of this detection, preprocessing and post-processing included.
        pixel_threshold: the mask's threshold when it differs from the verdict's (a calibrated profile); else None.
        calibration: where the thresholds come from: "calibrated on N good (+ M defective) images" or
            "uncalibrated (threshold 0.5)".
        references: how many reference images of good parts were used (0: zero-shot).
        note: a warning about this image, e.g. that it does not look like the reference images.
        original_size: (width, height) of the upright original image.
        model_map: (S, S) float32 map at the model's input size (None for tiled detections, whose
            ``anomaly_map`` is already at the original size).
        tiles: how many windows a tiled detection scored; 0 for a whole-image detection.
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
    def gives_verdict(self) -> bool:
        return gives_verdict(self.status, self.calibration)

    @property
    def is_anomalous(self) -> bool | None:
        return self.verdict == "anomalous" if self.gives_verdict else None

    @property
    def verdict(self) -> str:
        """"anomalous", "normal", or "none" where no threshold means anything (``NO_VERDICT_LINE`` says how to get one)."""
        reached = verdict(self.score, self.threshold)  # a non-finite score raises here, verdict or not
        return reached if self.gives_verdict else NO_VERDICT

    @property
    def verdict_line(self) -> str:
        """The verdict with the one threshold applied and where it comes from, or how to get a verdict."""
        if not self.gives_verdict:
            return NO_VERDICT_LINE
        return f"{self.verdict} at threshold {self.threshold:.3f} ({self.calibration})"

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
        return resize_map(self.model_map, (width, height))

    def full_resolution_mask(self) -> np.ndarray:
        """(H, W) bool mask at the original image's size, at the mask's (pixel) threshold, as ``mask`` is."""
        return self.full_resolution_map() >= self.mask_threshold

    def summary(self) -> dict:
        """JSON-ready numbers and words (no arrays)."""
        return {
            "method": self.method,
            "status": self.status,
            "class_name": self.class_name,
            "score": self.score,
            "verdict": self.verdict,
            "verdict_line": self.verdict_line,
            "threshold": self.threshold if self.gives_verdict else None,
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


def build_detection(*, method: str, status: str, class_name: str, score: float, picture: Image.Image,
                    thresholds: tuple[float, float, str], model_map: np.ndarray | None = None,
                    anomaly_map: np.ndarray | None = None, **fields) -> Detection:
    """The one place a ``Detection`` is made: the map at ``picture``'s size (``model_map`` resized, or an
    ``anomaly_map`` already at that size: tiles), its mask at the pixel threshold and the overlay.

    ``thresholds`` is ``thresholds(...)``'s (image, pixel, calibration); ``fields`` are the remaining Detection
    fields (details, seconds, references, note, original_size, tiles)."""
    image_threshold, pixel_threshold, calibration = thresholds
    if anomaly_map is None:
        anomaly_map, mask = ZSADImageProcessor.postprocess(model_map, picture.size, pixel_threshold)
    else:
        mask = anomaly_map >= pixel_threshold
    return Detection(
        method=method, status=status, class_name=class_name, score=float(score), threshold=image_threshold,
        anomaly_map=anomaly_map, mask=mask, overlay=overlay_heatmap(picture, anomaly_map),
        pixel_threshold=pixel_threshold if pixel_threshold != image_threshold else None, calibration=calibration,
        model_map=model_map, **fields,
    )


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value
