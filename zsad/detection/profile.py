"""What zsad knows about one product: reference images of good parts and calibrated thresholds.

```python
>>> profile = detector.build_profile("stackclip", "metal nut", "good_parts/", defective_images="bad_parts/")
>>> profile.calibration.describe()   # 'calibrated on 8 good (+ 5 defective) images: F1-max, 0 of 8 good images flagged ...'
>>> profile.save("metal_nut_profile/")             # memory.safetensors + profile.json
>>> detector.detect("part.png", "metal nut", method="stackclip", profile=ProductProfile.load("metal_nut_profile/"))
```

Thresholds come from leave-one-out scores of the good images (each scored against the other references, never
itself) and, when given, the scores of defective images (docs/METHODS.md, "Calibration").
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..modeling.exceptions import ZSADError
from ..runtime.atomic import atomic_folder
from ..runtime.provenance import zsad_version
from .conformal import conformal_threshold, false_alarm_bound, good_images_needed, rate_in_words
from .profile_card import CARD_FILE, profile_card
from .references import FusionScale, MethodOutputs, ReferenceMemory, SourceMaps
from .results import uncalibrated_description  # noqa: F401  (its name here is public)

PROFILE_JSON = "profile.json"
MEMORY_FILE = "memory.safetensors"
# The references' own method maps and global probabilities, kept next to their features in MEMORY_FILE.
METHOD_MAPS, GLOBAL_SCORES = "method_maps", "global_scores"
# 2: the fused maps' scale (FusionScale) and the value-value stream's start; format 1 fused raw maps.
FORMAT_VERSION = 2
# Reference-map shares tried when defective images are given to calibration (references first: ties keep them).
WEIGHT_GRID = (1.0, 0.75, 0.5, 0.25, 0.0)
DEFAULT_QUANTILE = 1.0
DEFAULT_MARGIN = 0.01
# A test image whose mean patch distance to the references exceeds this many times the largest leave-one-out mean
# distance among the references does not look like them as a whole (a defect moves only a few patches).
MISMATCH_FACTOR = 2.0


@dataclass
class Calibration:
    """Thresholds and the numbers they came from.

    Args:
        image_threshold: the verdict is "anomalous" when the image score is at least this.
        pixel_threshold: the mask holds the pixels whose map value is at least this.
        rule: "conformal" (good images, a false-alarm rate asked), "good quantile" (good images, quantile + margin) or
            "F1-max" (labelled defective images too).
        good_scores: leave-one-out image scores of the good images.
        defective_scores: image scores of the defective images.
        quantile, margin: of the good-quantile rule (thresholds = quantile of the good values + margin).
        reference_mean_distance: the largest leave-one-out mean patch distance among the references.
        false_alarm_target: the false-alarm rate asked for (the conformal rule), else None.
        allow_higher_rate: whether the best reachable rate 1 / (n + 1) was accepted when the good images were too few
            for ``false_alarm_target``.
        rank: k, the thresholds lie above the k-th smallest good value (image scores, map maxima) whatever the scores
            (None for F1-max, whose thresholds follow the defective images).
        false_alarm_bound: (n + 1 - k) / (n + 1), the most a new good part from the same process is flagged
            (docs/METHODS.md, "Calibrated false-alarm rate"); None for F1-max.
    """

    image_threshold: float
    pixel_threshold: float
    rule: str
    good_scores: list[float]
    defective_scores: list[float] = field(default_factory=list)
    quantile: float = DEFAULT_QUANTILE
    margin: float = DEFAULT_MARGIN
    reference_mean_distance: float = 0.0
    false_alarm_target: float | None = None
    allow_higher_rate: bool = False
    rank: int | None = None
    false_alarm_bound: float | None = None

    def __post_init__(self):
        if (self.rank is None) != (self.false_alarm_bound is None):
            raise ValueError("rank and false_alarm_bound go together")
        if self.rank is not None and not (0 <= self.rank <= self.num_good and
                                          self.false_alarm_bound == false_alarm_bound(self.num_good, self.rank)):
            raise ValueError(f"false_alarm_bound {self.false_alarm_bound} is not (n + 1 - k) / (n + 1) for n = {self.num_good}, "
                             f"k = {self.rank}")

    @property
    def num_good(self) -> int:
        return len(self.good_scores)

    @property
    def num_defective(self) -> int:
        return len(self.defective_scores)

    def describe(self) -> str:
        """E.g. 'calibrated on 19 good images: at most 1 in 20 good parts flagged'."""
        defective = f" (+ {self.num_defective} defective)" if self.num_defective else ""
        return f"calibrated on {self.num_good} good{defective} images: {self.rate_statement()}"

    def rate_statement(self) -> str:
        """What the thresholds promise on good parts: the guaranteed bound (and a rate asked but not reached), or for
        F1-max the measured leave-one-out share of the good images flagged."""
        if self.rank is None:
            flagged = int(np.sum(np.asarray(self.good_scores) >= self.image_threshold))
            return f"F1-max, {flagged} of {self.num_good} good images flagged leave-one-out (no guaranteed rate)"
        statement = f"at most {rate_in_words(self.num_good, self.rank)} good parts flagged"
        if self.false_alarm_target is not None and self.false_alarm_bound > self.false_alarm_target + 1e-12:
            statement += (f" (asked {self.false_alarm_target:g}, which needs {good_images_needed(self.false_alarm_target)} "
                          "good images)")
        return statement

    def false_alarm_rate(self) -> float:
        """Share of the good images whose leave-one-out score reaches the image threshold."""
        return float(np.mean(np.asarray(self.good_scores) >= self.image_threshold))


def check_quantile(quantile: float, margin: float) -> None:
    if not 0.0 < quantile <= 1.0:
        raise ZSADError(f"The calibration quantile must be in (0, 1], got {quantile}.")
    if not 0.0 <= margin < 1.0:
        raise ZSADError(f"The calibration margin must be in [0, 1), got {margin}.")


def good_quantile_threshold(values, quantile: float, margin: float) -> float:
    """``quantile`` of ``values`` plus ``margin``, at most 1 (quantile 1: the largest value)."""
    return float(min(1.0, np.quantile(np.asarray(values, dtype=np.float64), quantile) + margin))


def quantile_rule_rank(num_good: int, quantile: float, margin: float) -> int:
    """The k whose k-th smallest good value the good-quantile threshold always exceeds: numpy's linear quantile lies
    at or above the value at index floor((n - 1) * quantile) (0-based), strictly above it with a margin (quantile 1 and
    margin 0.01: k = n)."""
    rank = int(np.floor((num_good - 1) * quantile)) + (1 if margin > 0 else 0)
    return max(0, min(rank, num_good))


def f1_max_threshold(labels, scores) -> float:
    """The threshold at which "score >= threshold" has the largest F1 against the 0/1 labels (images, or pixels
    flattened), from scikit-learn's exact precision-recall curve (every distinct score is a threshold)."""
    f1, thresholds = _f1_curve(labels, scores)
    return float(thresholds[int(np.argmax(f1[:-1]))])  # the last point (recall 0) has no threshold


def f1_max_score(labels, scores) -> float:
    """The largest F1 of "score >= threshold" over every threshold."""
    return float(_f1_curve(labels, scores)[0].max())


def _f1_curve(labels, scores):
    from sklearn.metrics import precision_recall_curve  # calibration only: the serving path does without scikit-learn

    precision, recall, thresholds = precision_recall_curve(np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64))
    return 2 * precision * recall / np.maximum(precision + recall, np.finfo(np.float64).tiny), thresholds


def choose_weight(scale: FusionScale, good: list[SourceMaps], defective: list[SourceMaps], masks=None,
                  map_weight: float = 0.5) -> float:
    """The WEIGHT_GRID value whose fusion has the largest F1-max on the calibration images: over pixels with
    ``masks`` ((S, S) bool, one per defective image), else over image scores."""
    best, best_f1 = WEIGHT_GRID[0], -1.0
    for weight in WEIGHT_GRID:
        candidate = scale.with_weight(weight)
        good_fused = [candidate.fuse(batch, map_weight) for batch in good]
        bad_fused = [candidate.fuse(batch, map_weight) for batch in defective]
        if masks is not None:
            maps = torch.cat([batch.anomaly_map for batch in good_fused + bad_fused]).numpy()
            labels = np.concatenate([np.zeros((sum(len(b.anomaly_map) for b in good_fused),) + maps.shape[1:], bool), np.stack(masks)])
            f1 = f1_max_score(labels.ravel(), maps.ravel())
        else:
            scores = torch.cat([batch.image_score for batch in good_fused + bad_fused]).numpy()
            labels = [0] * sum(len(b.image_score) for b in good_fused) + [1] * sum(len(b.image_score) for b in bad_fused)
            f1 = f1_max_score(labels, scores)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = weight, f1
    return best


def calibrate(good_scores, good_maps, defective_scores=(), defective_maps=(), masks=None, quantile: float = DEFAULT_QUANTILE,
              margin: float = DEFAULT_MARGIN, reference_mean_distance: float = 0.0, false_alarm_rate: float | None = None,
              allow_higher_rate: bool = False) -> Calibration:
    """Thresholds from leave-one-out good scores and maps (S, S) and, optionally, defective ones (with masks (S, S)).

    ``false_alarm_rate``: each threshold is the split-conformal threshold for that rate on the good values (image
    scores, map maxima), ``zsad.detection.conformal.conformal_threshold``; defective images then only choose the fusion weight.
    Else, good images only: each threshold is ``quantile`` of the good values plus ``margin``; with defective images,
    the image threshold maximises F1, and with masks too, so does the pixel threshold.
    """
    check_quantile(quantile, margin)
    good_scores, defective_scores = [float(s) for s in good_scores], [float(s) for s in defective_scores]
    maxima = [float(m.max()) for m in good_maps]
    common = dict(defective_scores=defective_scores, quantile=quantile, margin=margin, reference_mean_distance=reference_mean_distance)
    if false_alarm_rate is not None:
        image = conformal_threshold(good_scores, false_alarm_rate, allow_higher_rate)
        pixel = conformal_threshold(maxima, false_alarm_rate, allow_higher_rate)
        return Calibration(image.threshold, pixel.threshold, "conformal", good_scores, false_alarm_target=false_alarm_rate,
                           allow_higher_rate=allow_higher_rate, rank=image.rank, false_alarm_bound=image.bound, **common)
    if defective_scores:
        image_threshold = f1_max_threshold([0] * len(good_scores) + [1] * len(defective_scores), good_scores + defective_scores)
        pixel_threshold = good_quantile_threshold(maxima, quantile, margin)
        if masks is not None:
            pixels = np.concatenate([np.zeros(m.size, dtype=bool) for m in good_maps] + [np.ravel(m) for m in masks])
            pixel_threshold = f1_max_threshold(pixels, np.concatenate([np.ravel(m) for m in [*good_maps, *defective_maps]]))
        return Calibration(image_threshold, pixel_threshold, "F1-max", good_scores, **common)
    rank = quantile_rule_rank(len(good_scores), quantile, margin)
    return Calibration(good_quantile_threshold(good_scores, quantile, margin), good_quantile_threshold(maxima, quantile, margin),
                       "good quantile", good_scores, rank=rank, false_alarm_bound=false_alarm_bound(len(good_scores), rank), **common)


@dataclass
class ProductProfile:
    """Reference memory and calibration of one product for one method on one backbone.

    ``calibration`` is None with a single reference (leave-one-out needs two); the references are used all the same.
    ``backbone`` is the model config's backbone (a Hub id or an absolute path) and ``backbone_hub_id`` its Hub id, so
    the profile also fits the same backbone loaded from another copy. ``outputs`` are the method's own map and global
    probability of each reference (what adding references recalibrates with); None in a profile saved without them.
    """

    method: str
    class_name: str
    memory: ReferenceMemory
    calibration: Calibration | None
    backbone: str
    backbone_revision: str | None
    fusion: FusionScale
    zsad_version: str = field(default_factory=zsad_version)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    backbone_hub_id: str | None = None
    provenance: dict | None = None  # zsad.runtime.provenance's block of the model that built it (None: a profile saved before it)
    outputs: MethodOutputs | None = None

    @property
    def num_references(self) -> int:
        return self.memory.num_images

    @property
    def image_size(self) -> int:
        return self.memory.image_size

    @property
    def feature_layers(self) -> list[int]:
        return list(self.memory.layers)

    def describe(self) -> str:
        """E.g. '4 reference images, calibrated on 4 good (+ 2 defective) images'."""
        calibration = self.calibration.describe() if self.calibration else "uncalibrated (leave-one-out needs two references)"
        return f"{self.num_references} reference image{'s' if self.num_references != 1 else ''}, {calibration}"

    def check_compatible(self, method: str, class_name: str, config) -> None:
        """Raise a ZSADError unless this profile fits ``method`` (its model's ``config``) and ``class_name``."""
        problems = []
        if method != self.method:
            problems.append(f"it was built for the method '{self.method}', not '{method}'")
        if class_name != self.class_name:
            problems.append(f"it was built for the product '{self.class_name}', not '{class_name}'")
        found = (config.base_model_name_or_path, config.base_model_revision)
        if not self._built_on(config):
            problems.append(f"it was built on the backbone {self.backbone} (revision {self.backbone_revision}), "
                            f"not {found[0]} (revision {found[1]})")
        if config.image_size != self.image_size:
            problems.append(f"it was built at {self.image_size} px, the model runs at {config.image_size} px")
        if list(config.feature_layers) != self.feature_layers:
            problems.append(f"it holds layers {self.feature_layers}, the model taps {list(config.feature_layers)}")
        if config.vv_attention_from != self.memory.vv_attention_from:
            problems.append(f"it holds features of vv_attention_from={self.memory.vv_attention_from}, the model uses "
                            f"{config.vv_attention_from}")
        if config.position_interpolation != self.memory.position_interpolation:
            problems.append(f"it holds features of position_interpolation={self.memory.position_interpolation!r}, the model "
                            f"uses {config.position_interpolation!r}")
        if problems:
            raise ZSADError("This product profile does not fit: " + "; ".join(problems) +
                            ". Build a new one with detector.build_profile(...) or `zsad calibrate`.")

    def _built_on(self, config) -> bool:
        """Whether the model's backbone is this profile's: the same path or Hub id, or copies of the same Hub id."""
        if (config.base_model_name_or_path, config.base_model_revision) == (self.backbone, self.backbone_revision):
            return True
        return self.backbone_hub_id is not None and (config.backbone_hub_id, config.base_model_revision) == (
            self.backbone_hub_id, self.backbone_revision)

    def mismatch_note(self, mean_distance: float) -> str | None:
        """A warning when a test image's mean patch distance says it is not the product the references show."""
        limit = MISMATCH_FACTOR * self.calibration.reference_mean_distance if self.calibration else None
        if not limit or mean_distance <= limit:
            return None
        return (f"This image does not look like the reference images as a whole (mean patch distance {mean_distance:.3f}, "
                f"references at most {self.calibration.reference_mean_distance:.3f}): are they of the same product?")

    # ----- files -----------------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write ``memory.safetensors`` (the reference features), ``profile.json`` (everything else, with the memory's
        sha256) and its card ``README.md`` as one artefact: into a temporary folder that then replaces ``directory`` (an
        earlier profile there is replaced whole; a kill leaves the old profile or the new one, never one's memory with the
        other's json)."""
        directory = Path(directory)
        tensors = {f"layer_{layer}": features.contiguous() for layer, features in zip(self.memory.layers, self.memory.features)}
        if self.outputs is not None:
            tensors |= {METHOD_MAPS: self.outputs.maps.cpu().contiguous(), GLOBAL_SCORES: self.outputs.global_scores.cpu().contiguous()}
        memory = save(tensors, metadata={"format": "pt"})
        with atomic_folder(directory, marker=PROFILE_JSON) as staging:
            (staging / MEMORY_FILE).write_bytes(memory)
            (staging / PROFILE_JSON).write_text(json.dumps(self._json(sha256(memory)), indent=1) + "\n")
            (staging / CARD_FILE).write_text(profile_card(self))
        return directory

    def _json(self, memory_sha256: str) -> dict:
        return {
            "format_version": FORMAT_VERSION, "memory_sha256": memory_sha256, "method": self.method, "class_name": self.class_name,
            "num_references": self.num_references, "fusion": asdict(self.fusion),
            "vv_attention_from": self.memory.vv_attention_from, "position_interpolation": self.memory.position_interpolation,
            "calibration": asdict(self.calibration) if self.calibration else None,
            "backbone": self.backbone, "backbone_revision": self.backbone_revision, "backbone_hub_id": self.backbone_hub_id,
            "dtype": str(self.memory.dtype),
            "image_size": self.image_size, "grid_size": self.memory.grid_size, "feature_layers": self.feature_layers,
            "zsad_version": self.zsad_version, "created": self.created, "provenance": self.provenance,
        }

    @classmethod
    def load(cls, directory) -> "ProductProfile":
        """Read a profile written by ``save``; a missing, truncated or inconsistent file is a ZSADError."""
        directory = Path(directory)
        meta = _read_json(directory / PROFILE_JSON)
        tensors = _read_memory(directory / MEMORY_FILE, meta.get("memory_sha256"))
        try:
            layers = [int(layer) for layer in meta["feature_layers"]]
            features = [tensors[f"layer_{layer}"] for layer in layers]
            memory = ReferenceMemory(layers, features, int(meta["grid_size"]), int(meta["image_size"]), meta["vv_attention_from"],
                                     meta.get("position_interpolation", "bicubic"))  # profiles from before the field: bicubic
            _check_memory(memory, int(meta["num_references"]))
            calibration = Calibration(**meta["calibration"]) if meta["calibration"] else None
            fusion = FusionScale(**meta["fusion"])
            _check_numbers(calibration, fusion)
            return cls(meta["method"], meta["class_name"], memory, calibration, meta["backbone"], meta["backbone_revision"],
                       fusion, meta["zsad_version"], meta["created"], meta.get("backbone_hub_id"),
                       meta.get("provenance"), _read_outputs(tensors, memory))
        except (KeyError, TypeError, ValueError) as error:
            raise ZSADError(f"The product profile in {directory} is incomplete or inconsistent ({type(error).__name__}: {error}); "
                            "build it again with `zsad calibrate` or detector.build_profile(...).") from error


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ZSADError(f"No {PROFILE_JSON} in {path.parent}: a product profile folder holds {PROFILE_JSON} and {MEMORY_FILE} "
                        "(written by `zsad calibrate` or ProductProfile.save).") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ZSADError(f"{path} is not valid JSON ({error}); the profile is corrupt, build it again.") from error
    if isinstance(meta, dict) and meta.get("format_version") == 1:
        raise ZSADError(f"{path} is a product profile of format 1, which fused raw maps (the method's map could drown the "
                        "reference map); this zsad puts both on the good images' scale. Build it again from the same good "
                        "images with `zsad calibrate` or detector.build_profile(...).")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ZSADError(f"{path} is not a zsad product profile of format {FORMAT_VERSION}; build it again.")
    return meta


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _read_memory(path: Path, expected_sha256) -> dict[str, torch.Tensor]:
    """The memory's tensors, after checking its bytes are the ones ``profile.json`` was written with."""
    if not path.is_file():
        raise ZSADError(f"No {MEMORY_FILE} in {path.parent}: the reference features are missing; build the profile again.")
    if not isinstance(expected_sha256, str):
        raise ZSADError(f"{path.parent / PROFILE_JSON} records no sha256 of {MEMORY_FILE} (a profile written by an older zsad, "
                        "or edited); build the profile again with `zsad calibrate`.")
    data = path.read_bytes()
    if sha256(data) != expected_sha256:
        raise ZSADError(f"{path} is not the memory {PROFILE_JSON} was written with (sha256 differs): the file was replaced, "
                        "copied from another profile or damaged. Build the profile again with `zsad calibrate`.")
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as error:
        raise ZSADError(f"{path} could not be read ({error}); the file is truncated or corrupt, build the profile again.") from error


def _check_numbers(calibration: Calibration | None, fusion: FusionScale) -> None:
    """ValueError naming the first threshold outside [0, 1], spread not positive or number not finite."""
    unit_interval = {"fusion weight": fusion.weight}
    if calibration is not None:
        unit_interval |= {"image threshold": calibration.image_threshold, "pixel threshold": calibration.pixel_threshold}
    for name, value in unit_interval.items():
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"the {name} {value!r} is not a number in [0, 1]")
    for name in ("method_spread", "reference_spread"):
        value = getattr(fusion, name)
        if value is not None and (not _is_number(value) or value <= 0.0):
            raise ValueError(f"the fusion's {name} {value!r} is not a positive number")
    for name in ("method_location", "reference_location"):
        value = getattr(fusion, name)
        if value is not None and not _is_number(value):
            raise ValueError(f"the fusion's {name} {value!r} is not a finite number")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_outputs(tensors: dict[str, torch.Tensor], memory: ReferenceMemory) -> MethodOutputs | None:
    if METHOD_MAPS not in tensors and GLOBAL_SCORES not in tensors:
        return None
    outputs = MethodOutputs(tensors[METHOD_MAPS], tensors[GLOBAL_SCORES])
    size, count = memory.image_size, memory.num_images
    if tuple(outputs.maps.shape) != (count, size, size) or tuple(outputs.global_scores.shape) != (count,):
        raise ValueError(f"{METHOD_MAPS} {tuple(outputs.maps.shape)} and {GLOBAL_SCORES} {tuple(outputs.global_scores.shape)} "
                         f"do not fit {count} references at {size} px")
    return outputs


def _check_memory(memory: ReferenceMemory, num_references: int) -> None:
    patches = memory.grid_size ** 2
    for layer, features in zip(memory.layers, memory.features):
        if features.dim() != 3 or features.shape[:2] != (num_references, patches):
            raise ValueError(f"layer {layer} holds features of shape {tuple(features.shape)}, "
                             f"expected ({num_references}, {patches}, width)")
