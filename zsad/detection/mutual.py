"""Zero-shot from the batch itself: mutual scoring of unlabeled images of one product (MuSc, Li et al., ICLR 2024;
docs/METHODS.md, "Mutual scoring"), as ``Detection``s. The arithmetic is ``zsad.modeling.mutual_scoring`` (torch
only, shared with the checkpoints' pipeline); its names are public here too.

A lot is split into groups of at most ``max_compared + 1`` images before any image is decoded for scoring, from the
files' bytes (or an in-memory image's pixels), so the same lot always gives the same groups whatever the order of its
images. Each group is decoded, encoded, scored and handed back on its own, then freed: memory is that of one group,
whatever the size of the lot.

```python
>>> from zsad.detection.mutual import MutualSettings, detect_mutual, detect_mutual_groups, mutual_scores
>>> results = detect_mutual(detector, ["lot/001.png", "lot/002.png", ...], "metal nut")  # one Detection per image, in order
>>> for group in detect_mutual_groups(detector, Path("lot").glob("*.png"), "metal nut"):  # flat memory, any lot size
...     group.indices, group.outcomes                      # positions in the lot; a Detection (or ZSADError) for each
>>> scores = mutual_scores([tokens_1, tokens_2, ...], MutualSettings(max_compared=16))  # (L, P, D) per image
>>> scores.patch_maps    # (N, P) mean distance to the closest images' nearest patches
```
"""

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..modeling.exceptions import ZSADError
from ..modeling.mutual_scoring import (
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
    score_group,
    standardise,
    to_unit,
)
from ..runtime.engine import model_features
from ..runtime.images import read_image
from ..runtime.methods import status
from ..runtime.noise import bar_disable
from .references import reference_map
from .results import MUTUAL_CALIBRATION, Detection, build_detection, thresholds

__all__ = ["MutualBatch", "MutualDetails", "MutualGroup", "MutualScores", "MutualSettings", "aggregate", "check_batch",
           "comparison_groups", "content_key", "detect_mutual", "detect_mutual_groups", "far_notes", "fused", "group_id",
           "lot_groups", "lot_keys", "map_image_scores", "mutual_map", "mutual_scores", "rescore", "score_batch", "score_group",
           "standardise", "to_unit"]


@dataclass
class MutualDetails:
    """A mutual detection's own parts: how many images it was compared with, its median nearest-patch distance
    (how much it looks like the others), the weights of the fused sources and the method's own details."""

    compared_with: int
    median_distance: float
    text_weight: float
    reference_weight: float
    method: Any = None


@dataclass
class MutualGroup:
    """One scored group of a lot: ``indices`` its images' positions in the lot, ``outcomes`` the ``Detection`` of
    each (or, when unreadable images are skipped, the ``ZSADError`` that kept it from being scored), ``id`` a hash of
    its images' keys (the same group of the same images always has the same id)."""

    indices: list[int]
    outcomes: list[Detection | ZSADError]
    id: str


def source_key(source) -> str:
    """A cheap, deterministic content key: the sha256 of a file's or a buffer's bytes (nothing decoded), else of an
    in-memory image's decoded pixels (``content_key``). A file that cannot be read gets a key naming it, so that it
    fails (or is skipped) where its group is decoded."""
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as stream:
                return hashlib.file_digest(stream, "sha256").hexdigest()
        except OSError:
            return f"unreadable:{source}"
    if isinstance(source, (bytes, bytearray)):
        return hashlib.sha256(source).hexdigest()
    return content_key(read_image(source).image)


def lot_keys(images: Sequence) -> list[str]:
    """``source_key`` of every image of a lot."""
    return [source_key(image) for image in images]


def lot_groups(keys: Sequence[str], settings: MutualSettings = MutualSettings(), names: Sequence[str] | None = None) -> list[list[int]]:
    """A lot's comparison groups from its keys (``lot_keys``), fixed before anything is encoded and independent of
    the order of the images and of how many processes share them; ``names`` order exact duplicates. Refuses fewer than
    two images, or only copies of one."""
    check_batch(keys)
    return comparison_groups(keys, settings.max_compared, names)


def group_id(keys: Sequence[str]) -> str:
    """A group's id: a short hash of its images' keys, in any order."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def detect_mutual(detector, images: Iterable, class_name: str, **options) -> list[Detection]:
    """Score ``images`` (paths, bytes, PIL images, arrays, or an iterable of them; N >= 2, one product, any sizes)
    against each other: ``detect_mutual_groups``'s detections, all held and returned in input order. For a lot larger
    than memory, iterate ``detect_mutual_groups`` instead."""
    images = list(images)
    results: list[Detection | None] = [None] * len(images)
    for group in detect_mutual_groups(detector, images, class_name, **options):
        for index, outcome in zip(group.indices, group.outcomes):
            results[index] = outcome
    return results


def detect_mutual_groups(detector, images: Iterable, class_name: str, method: str = "baseline", threshold: float | None = None,
                         profile=None, settings: MutualSettings = MutualSettings(), batch_size: int = 8,
                         display_side: int | None = None, progress: bool = False,
                         turn: Callable[[], AbstractContextManager] = nullcontext, names: Sequence[str] | None = None,
                         keys: Sequence[str] | None = None, groups: Sequence[Sequence[int]] | None = None,
                         skip_unreadable: bool = False) -> Iterator[MutualGroup]:
    """Score ``images`` (paths, bytes, PIL images, arrays, or an iterable of them: paths keep memory flat, since each
    is decoded with its group only; N >= 2, one product, any sizes) against each other with ``detector``'s backbone,
    at ``method``'s input size and tapped layers, one ``MutualGroup`` at a time; maps at each image's size as
    ``detect`` returns them (longest side at most ``display_side`` when given). ``groups`` (``lot_groups``'s, or some
    of them: a process's share, those left to resume) default to every group of the lot; ``keys`` are ``lot_keys``'s
    when already computed. The mutual map is fused with
    the method's text map (``text_weight``) and with a ``profile``'s reference map when given, each standardised over
    the group first. Maps and scores are on the group's scale: 0.5 is ``settings.offset`` robust standard deviations
    above the group's typical pixel / image, the verdict threshold unless ``threshold`` is given. Each encoding batch
    and each group's scoring runs inside ``turn()`` (a server's turn on the model, e.g. the Space's). With
    ``skip_unreadable`` an image that cannot be read (or a group left with too few readable images) gets its
    ``ZSADError`` as its outcome instead of raising; ``names`` are the images' names in errors (and order exact
    duplicates into groups)."""
    images = list(images)
    names = list(names) if names is not None else [str(image) if isinstance(image, (str, Path)) else "" for image in images]
    keys = lot_keys(images) if keys is None else list(keys)
    groups = lot_groups(keys, settings, names) if groups is None else [list(group) for group in groups]
    model = detector.model(method)
    name = detector.product_name(class_name, method)
    text_weight = default_text_weight(settings, status(model) == "trained")
    reference = None
    if profile is not None:
        profile.check_compatible(method, name, model.config)

        def reference(features, sigma):
            return reference_map(profile.memory.to(features.image_embeds.device, features.layer_tokens[0].dtype), features, sigma)

    image_threshold, pixel_threshold, calibration = thresholds(threshold, None)
    scoring = _GroupScoring(model, method, name, text_weight, reference, profile, settings, batch_size, display_side, turn,
                            (image_threshold, pixel_threshold, f"{MUTUAL_CALIBRATION}{calibration}"), skip_unreadable,
                            partial(model_features, detector.engine, model))
    return (MutualGroup(group, scoring.outcomes(images, names, group), group_id([keys[i] for i in group]))
            for group in tqdm(groups, unit="group", desc="mutual scoring", disable=bar_disable(progress)))


@dataclass
class _GroupScoring:
    """What every group of one call is scored with."""

    model: Any
    method: str
    name: str
    text_weight: float
    reference: Callable | None
    profile: Any
    settings: MutualSettings
    batch_size: int
    display_side: int | None
    turn: Callable[[], AbstractContextManager]
    chosen: tuple[float, float, str]
    skip_unreadable: bool
    encode: Callable  # pixel values -> the model's features, on the detector's engine

    def outcomes(self, images: list, names: list[str], group: list[int]) -> list[Detection | ZSADError]:
        """The group decoded, scored and turned into Detections; errors in place of images that could not be read
        (and of the whole group when fewer than two different images are left) when they are skipped."""
        started = time.perf_counter()
        outcomes: dict[int, Any] = {}
        for index in group:
            try:
                outcomes[index] = read_image(images[index], name=names[index] or None, max_side=self.display_side)
            except ZSADError as error:
                if not self.skip_unreadable:
                    raise
                outcomes[index] = error
        readable = [index for index in group if not isinstance(outcomes[index], ZSADError)]
        loaded = [outcomes[index] for index in readable]
        try:
            batch = score_group(self.model, [item.image for item in loaded], [content_key(item.image) for item in loaded], self.name,
                                self.text_weight, self.settings, self.batch_size, False, self.turn, self.reference, self.encode)
        except ZSADError as error:
            if not self.skip_unreadable:
                raise
            return [outcomes[index] if isinstance(outcomes[index], ZSADError) else ZSADError(f"Not scored with its group: {error}")
                    for index in group]
        seconds = (time.perf_counter() - started) / len(loaded)
        for position, (index, item) in enumerate(zip(readable, loaded)):
            outcomes[index] = self.detection(batch, position, item, seconds)
        return [outcomes[index] for index in group]

    def detection(self, batch: MutualBatch, i: int, item, seconds: float) -> Detection:
        return build_detection(
            method=self.method, status=status(self.model), class_name=self.name, score=float(batch.scores[i]), picture=item.image,
            thresholds=self.chosen, model_map=batch.maps[i].numpy(),
            details=MutualDetails(int(batch.compared[i]), round(float(batch.median_distance[i]), 4), self.text_weight,
                                  self.settings.reference_weight if self.profile is not None else 0.0, batch.method_details[i]),
            seconds=seconds, references=self.profile.num_references if self.profile is not None else 0, note=batch.notes[i],
            original_size=item.original_size,
        )
