"""Reference images of good parts (few-shot, training-free): a memory of their patch features and a map of how far
each patch of a test image is from its nearest reference patch (docs/METHODS.md, "Reference images").

```python
>>> memory = ReferenceMemory.from_features(model.encode_image(reference_pixels))   # K good images, one pass
>>> distances = reference_map(memory, model.encode_image(test_pixels), sigma=4.0)   # (B, S, S) in [0, 1]
>>> fused = fuse(output.anomaly_map, distances, weight=0.5)
```

The memory holds the L2-normalised patch tokens of the tapped layers in the backbone's dtype: K = 8 images at
518 px (37 x 37 patches) and four layers of width 1024 are 8 * 1369 * 4 * 1024 values, 90 MB in bfloat16.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ZSADError
from .modeling.anomaly_maps import combine_layer_maps, scaled_sigma, upsample_patch_maps
from .modeling.clip_backbone import ImageFeatures

# Largest (query patches x reference patches) block of similarities computed at once: 2^24 values are 64 MB in
# float32, whatever the number of references.
SIMILARITY_BLOCK = 1 << 24


@dataclass
class ReferenceMemory:
    """Patch features of K good images: ``features[i]`` is (K, N, D), L2-normalised, for block ``layers[i]``."""

    layers: list[int]
    features: list[torch.Tensor]
    grid_size: int
    image_size: int

    @classmethod
    def from_features(cls, features: ImageFeatures) -> "ReferenceMemory":
        """The memory of an encoded batch of good images (every layer the features hold)."""
        patches = [F.normalize(features.patch_tokens(i).float(), dim=-1).to(features.layer_tokens[i].dtype)
                   for i in range(len(features.layers))]
        return cls(list(features.layers), patches, features.grid_size, features.image_size)

    @classmethod
    def concatenate(cls, memories: list["ReferenceMemory"]) -> "ReferenceMemory":
        """One memory from several (batches of references encoded apart)."""
        first = memories[0]
        features = [torch.cat([memory.features[i] for memory in memories]) for i in range(len(first.layers))]
        return cls(first.layers, features, first.grid_size, first.image_size)

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
        return ReferenceMemory(self.layers, [layer[keep] for layer in self.features], self.grid_size, self.image_size)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "ReferenceMemory":
        return ReferenceMemory(self.layers, [layer.to(device=device, dtype=dtype) for layer in self.features],
                               self.grid_size, self.image_size)

    def patch_distances(self, features: ImageFeatures) -> torch.Tensor:
        """(B, L, N) float32: 1 - cosine similarity of each test patch to its nearest reference patch, per layer."""
        if features.grid_size != self.grid_size:
            raise ZSADError(f"Test images were encoded at {features.image_size} px, the references at {self.image_size} px; "
                            "encode both at the model's image_size.")
        features = features.select(self.layers)
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
    return distance_map(memory.patch_distances(features), features, sigma)


def distance_map(distances: torch.Tensor, features: ImageFeatures, sigma: float) -> torch.Tensor:
    layer_maps = upsample_patch_maps(distances, features.grid_size, features.image_size)
    return combine_layer_maps(layer_maps, sigma).clamp_(0.0, 1.0)


def fuse(zero_shot: torch.Tensor, reference: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) * zero-shot + weight * reference, in [0, 1] (maps or image scores)."""
    return ((1.0 - weight) * zero_shot.float() + weight * reference.float()).clamp_(0.0, 1.0)


@dataclass
class ReferenceScores:
    """A batch's maps (B, S, S) and image scores (B,) fused with the references, and each image's mean patch
    distance to them (B,) (how much the image as a whole looks like the references)."""

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    mean_distance: torch.Tensor


def apply_references(memory: ReferenceMemory, features: ImageFeatures, anomaly_map: torch.Tensor, image_score: torch.Tensor,
                     weight: float, config) -> ReferenceScores:
    """Fuse a method's maps and image scores with the reference map (image score: with the reference map's maximum),
    smoothed as the model's ``config`` smooths its own maps."""
    memory = memory.to(features.image_embeds.device, features.layer_tokens[0].dtype)
    sigma = scaled_sigma(config.smoothing_sigma, features.image_size, config.smoothing_reference_size)
    distances = memory.patch_distances(features)
    reference = distance_map(distances, features, sigma)
    return ReferenceScores(fuse(anomaly_map, reference, weight), fuse(image_score, reference.flatten(1).amax(dim=1), weight),
                           distances.mean(dim=(1, 2)))


def single_image(features: ImageFeatures, index: int) -> ImageFeatures:
    """Image ``index`` of an encoded batch, as a batch of one."""
    return ImageFeatures(features.layers, [tokens[index:index + 1] for tokens in features.layer_tokens],
                         features.image_embeds[index:index + 1], features.grid_size, features.image_size,
                         features.vv_attention_from)
