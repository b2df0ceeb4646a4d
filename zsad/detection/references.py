"""Reference images of good parts (few-shot, training-free): a memory of their patch features and a map of how far
each patch of a test image is from its nearest reference patch (docs/METHODS.md, "Reference images").

```python
>>> memory = ReferenceMemory.from_features(model.encode_image(reference_pixels))   # K good images, one pass
>>> distances = reference_map(memory, model.encode_image(test_pixels), sigma=4.0)   # (B, S, S) in [0, 1]
>>> fused = apply_references(memory, features, output.anomaly_map, output.global_score, scale, model.config)
```

Both maps are put on the good images' scale before they are fused (``FusionScale``): a softmax map saturates near 0
and 1 while nearest-patch distances sit in a narrow band, so fusing raw values lets the method's map drown the
reference map.

The memory holds the L2-normalised patch tokens of the tapped layers in the backbone's dtype: K = 8 images at
518 px (37 x 37 patches) and four layers of width 1024 are 8 * 1369 * 4 * 1024 values, 90 MB in bfloat16.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling.anomaly_maps import SIMILARITY_BLOCK, combine_layer_maps, scaled_sigma, upsample_patch_maps
from ..modeling.clip_backbone import ImageFeatures
from ..modeling.exceptions import ZSADError


@dataclass
class ReferenceMemory:
    """Patch features of K good images: ``features[i]`` is (K, N, D), L2-normalised, for block ``layers[i]`` (of the
    value-value stream from ``vv_attention_from`` on, as ``ImageFeatures``)."""

    layers: list[int]
    features: list[torch.Tensor]
    grid_size: int
    image_size: int
    vv_attention_from: int | None = None
    position_interpolation: str = "bicubic"

    @classmethod
    def from_features(cls, features: ImageFeatures) -> "ReferenceMemory":
        """The memory of an encoded batch of good images (every layer the features hold)."""
        patches = [F.normalize(features.patch_tokens(i).float(), dim=-1).to(features.layer_tokens[i].dtype)
                   for i in range(len(features.layers))]
        return cls(list(features.layers), patches, features.grid_size, features.image_size, features.vv_attention_from,
                   features.position_interpolation)

    @classmethod
    def concatenate(cls, memories: list["ReferenceMemory"]) -> "ReferenceMemory":
        """One memory from several (batches of references encoded apart)."""
        first = memories[0]
        features = [torch.cat([memory.features[i] for memory in memories]) for i in range(len(first.layers))]
        return cls(first.layers, features, first.grid_size, first.image_size, first.vv_attention_from, first.position_interpolation)

    @property
    def num_images(self) -> int:
        return self.features[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(layer.numel() * layer.element_size() for layer in self.features)

    @property
    def dtype(self) -> torch.dtype:
        return self.features[0].dtype

    def leave_out(self, index: int) -> "ReferenceMemory":
        """The memory without reference ``index`` (to score a reference against the others)."""
        if self.num_images < 2:
            raise ZSADError("Leaving a reference out needs at least two reference images.")
        keep = [i for i in range(self.num_images) if i != index]
        return ReferenceMemory(self.layers, [layer[keep] for layer in self.features], self.grid_size, self.image_size,
                               self.vv_attention_from, self.position_interpolation)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "ReferenceMemory":
        return ReferenceMemory(self.layers, [layer.to(device=device, dtype=dtype) for layer in self.features],
                               self.grid_size, self.image_size, self.vv_attention_from, self.position_interpolation)

    def patch_distances(self, features: ImageFeatures) -> torch.Tensor:
        """(B, L, N) float32: 1 - cosine similarity of each test patch to its nearest reference patch, per layer."""
        if features.grid_size != self.grid_size:
            raise ZSADError(f"Test images were encoded at {features.image_size} px, the references at {self.image_size} px; "
                            "encode both at the model's image_size.")
        features = features.select(self.layers, self.vv_attention_from, self.position_interpolation)
        distances = []
        for i, memory in enumerate(self.features):
            queries = F.normalize(features.patch_tokens(i).float(), dim=-1).to(memory.dtype)
            distances.append(1.0 - nearest_similarity(queries, memory.flatten(0, 1)))
        return torch.stack(distances, dim=1)


def nearest_similarity(queries: torch.Tensor, memory: torch.Tensor, block: int = SIMILARITY_BLOCK) -> torch.Tensor:
    """(B, N, D) queries, (M, D) memory (both L2-normalised) -> (B, N) float32 largest cosine similarity.

    One matrix product per chunk of memory rows, chunked so that no more than ``block`` similarities exist at once.
    """
    flat = queries.flatten(0, 1)
    rows = max(1, block // max(flat.shape[0], 1))
    best = torch.full((flat.shape[0],), -1.0, dtype=torch.float32, device=flat.device)
    for start in range(0, memory.shape[0], rows):
        chunk = flat @ memory[start:start + rows].t()
        best = torch.maximum(best, chunk.amax(dim=1).float())
    return best.view(queries.shape[:2])


def reference_map(memory: ReferenceMemory, features: ImageFeatures, sigma: float) -> torch.Tensor:
    """(B, S, S) reference-distance map in [0, 1]: per-layer distances upsampled like the zero-shot maps, averaged
    over layers and smoothed with ``sigma`` pixels."""
    return distance_map(memory.patch_distances(features), features.grid_size, features.image_size, sigma)


def distance_map(distances: torch.Tensor, grid_size: int, image_size: int, sigma: float) -> torch.Tensor:
    layer_maps = upsample_patch_maps(distances, grid_size, image_size)
    return combine_layer_maps(layer_maps, sigma).clamp_(0.0, 1.0)


# Where a standardised source value of 1 (the good images' high quantile) lands on the fused map: 0.5, with this
# slope: the good images' median maps to sigmoid(-4) = 0.018, so the map stays a probability-like [0, 1] map.
FUSED_SLOPE = 4.0
# The good images' pixel quantile that is a source's spread above its median.
SPREAD_QUANTILE = 0.99
# A spread under this is a flat map (standardising by it would blow any difference up); refused when a profile is built.
MIN_SPREAD = 1e-6
# Reference-map share with good images only: the method's map of an untrained model is at chance on real weights
# (docs/METHODS.md, "Reference images"), so references only; a trained model's map keeps half (not measured here).
UNTRAINED_WEIGHT, TRAINED_WEIGHT = 1.0, 0.5


@dataclass
class SourceMaps:
    """A batch's two maps before fusion, (B, S, S) each: the method's own and the reference-distance map; the
    method's global probability (B,) and each image's mean patch distance to the references (B,)."""

    method_map: torch.Tensor
    reference_map: torch.Tensor
    global_score: torch.Tensor
    mean_distance: torch.Tensor


@dataclass
class ReferenceScores:
    """A batch's maps (B, S, S) and image scores (B,) fused with the references, and each image's mean patch
    distance to them (B,) (how much the image as a whole looks like the references)."""

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    mean_distance: torch.Tensor


@dataclass
class FusionScale:
    """How a profile fuses the two maps: each source standardised by the good images' pixel scores (location: median,
    spread: the SPREAD_QUANTILE minus the median), then ``(1 - weight) * method + weight * reference``, then a logistic
    that puts a standardised 1 at 0.5. Without a location (one reference: nothing to score leave-one-out) the raw
    maps are fused with the weight."""

    weight: float
    method_location: float | None = None
    method_spread: float | None = None
    reference_location: float | None = None
    reference_spread: float | None = None

    @classmethod
    def from_good(cls, good: list[SourceMaps], weight: float) -> "FusionScale":
        """The scale of leave-one-out maps of the good images (never of test images: that would be transductive)."""
        method = location_and_spread(torch.cat([batch.method_map for batch in good]), "method's")
        reference = location_and_spread(torch.cat([batch.reference_map for batch in good]), "reference")
        return cls(weight, *method, *reference)

    @property
    def is_standardised(self) -> bool:
        return self.method_location is not None

    def with_weight(self, weight: float) -> "FusionScale":
        return dataclasses.replace(self, weight=weight)

    def fuse_maps(self, sources: SourceMaps) -> torch.Tensor:
        """(B, S, S) fused map in [0, 1]."""
        method, reference = sources.method_map.float(), sources.reference_map.float()
        if not self.is_standardised:
            return ((1.0 - self.weight) * method + self.weight * reference).clamp_(0.0, 1.0)
        method = (method - self.method_location) / self.method_spread
        reference = (reference - self.reference_location) / self.reference_spread
        return torch.sigmoid(FUSED_SLOPE * ((1.0 - self.weight) * method + self.weight * reference - 1.0))

    def fuse(self, sources: SourceMaps, map_weight: float) -> ReferenceScores:
        """Fused maps and image scores: ``(1 - map_weight) * global probability + map_weight * max(fused map)``, the
        model's own image-score rule (``image_score_map_weight``) on the fused map."""
        fused = self.fuse_maps(sources)
        score = (1.0 - map_weight) * sources.global_score.float() + map_weight * fused.flatten(1).amax(dim=1)
        return ReferenceScores(fused, score.clamp_(0.0, 1.0), sources.mean_distance)


def location_and_spread(maps: torch.Tensor, source: str) -> tuple[float, float]:
    """(median, SPREAD_QUANTILE - median) of the pixel values of the good images' ``source`` maps; a spread that is
    not positive (flat maps: nothing to standardise by) or not finite is refused, as loading refuses it."""
    values = maps.float().flatten().cpu().numpy()
    median, high = np.quantile(values, [0.5, SPREAD_QUANTILE])
    if not (np.isfinite(median) and np.isfinite(high)):
        raise ZSADError(f"The good images' {source} maps hold non-finite values (NaN or inf), so no profile can be built "
                        "from them; the model's weights are damaged: load the checkpoint again or train it again.")
    if high - median < MIN_SPREAD:
        raise ZSADError(f"The good images' {source} maps are flat (spread {high - median:.1e}, under {MIN_SPREAD:g}), so the "
                        "profile has nothing to standardise them by; use more or different reference images of good parts.")
    return float(median), float(high - median)


def default_weight(is_trained: bool) -> float:
    return TRAINED_WEIGHT if is_trained else UNTRAINED_WEIGHT


def reference_sources(memory: ReferenceMemory, features: ImageFeatures, method_map: torch.Tensor, global_score: torch.Tensor,
                      config) -> SourceMaps:
    """The method's map and global probability next to the reference map, smoothed as the model's ``config`` smooths
    its own maps."""
    memory = memory.to(features.image_embeds.device, features.layer_tokens[0].dtype)
    sigma = scaled_sigma(config.smoothing_sigma, features.image_size, config.smoothing_reference_size)
    distances = memory.patch_distances(features)
    return SourceMaps(method_map.float(), distance_map(distances, features.grid_size, features.image_size, sigma), global_score.float(),
                      distances.mean(dim=(1, 2)))


@dataclass
class MethodOutputs:
    """Each reference image's own map from the method (K, S, S) and global probability (K,), float32: what fusing a
    reference's leave-one-out scores needs besides the memory. Neither depends on the other references, so a profile
    keeps them and more references can be added without the first images (``zsad.detection.calibration.add_references``)."""

    maps: torch.Tensor
    global_scores: torch.Tensor

    @classmethod
    def concatenate(cls, parts: list["MethodOutputs"]) -> "MethodOutputs":
        return cls(torch.cat([part.maps.cpu() for part in parts]), torch.cat([part.global_scores.cpu() for part in parts]))

    @property
    def num_images(self) -> int:
        return self.maps.shape[0]


def method_outputs(model, batches: list[ImageFeatures], class_name: str) -> MethodOutputs:
    """The method's map and global probability of every image of ``batches``, one image at a time (as detection
    scores it)."""
    maps, scores = [], []
    for batch in batches:
        for i in range(batch.batch_size):
            with torch.inference_mode():
                output = model(image_features=single_image(batch, i), class_names=[class_name])
            maps.append(output.anomaly_map.float())
            scores.append(output.global_score.float())
    return MethodOutputs(torch.cat(maps), torch.cat(scores))


def memory_leave_one_out(memory: ReferenceMemory, outputs: MethodOutputs, config) -> list[SourceMaps]:
    """Each reference's maps against the other references, never itself, from the memory alone: its stored patch
    features are the normalised tokens ``patch_distances`` would compute from the image."""
    sigma = scaled_sigma(config.smoothing_sigma, memory.image_size, config.smoothing_reference_size)
    results = []
    for index in range(memory.num_images):
        others = memory.leave_out(index)
        distances = torch.stack([1.0 - nearest_similarity(features[index:index + 1], rest.flatten(0, 1))
                                 for features, rest in zip(memory.features, others.features)], dim=1)
        device = distances.device
        results.append(SourceMaps(outputs.maps[index:index + 1].to(device), distance_map(distances, memory.grid_size, memory.image_size, sigma),
                                  outputs.global_scores[index:index + 1].to(device), distances.mean(dim=(1, 2))))
    return results


def leave_one_out_sources(model, memory: ReferenceMemory, batches: list[ImageFeatures], class_name: str) -> list[SourceMaps]:
    """Each reference image's maps (``batches`` in memory order) against the other references, never itself."""
    return memory_leave_one_out(memory, method_outputs(model, batches, class_name), model.config)


def apply_references(memory: ReferenceMemory, features: ImageFeatures, method_map: torch.Tensor, global_score: torch.Tensor,
                     scale: FusionScale, config) -> ReferenceScores:
    """A method's maps and global probabilities fused with the reference map on ``scale``."""
    return scale.fuse(reference_sources(memory, features, method_map, global_score, config), config.image_score_map_weight)


def single_image(features: ImageFeatures, index: int) -> ImageFeatures:
    """Image ``index`` of an encoded batch, as a batch of one (of the same class: a method's features may carry more
    per-image tensors, e.g. AnomalyCLIP's class tokens)."""
    return dataclasses.replace(features, **{field.name: _image_of(getattr(features, field.name), index)
                                            for field in dataclasses.fields(features)})


def _image_of(value, index: int):
    if isinstance(value, torch.Tensor):
        return value[index:index + 1]
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [tensor[index:index + 1] for tensor in value]
    return value
