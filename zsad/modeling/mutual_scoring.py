"""Mutual scoring's arithmetic (MuSc, Li et al., ICLR 2024; docs/METHODS.md, "Mutual scoring"), torch only, so the
checkpoints' pipeline (``pipeline_zsad.py``) runs it without zsad; ``zsad.detection.mutual`` builds Detections on it.

A normal patch finds close matches in most other images of the same product, a defect in few. Per tapped layer and
aggregation degree, each patch's distance to its nearest patch in every compared image is averaged over the closest
fraction of those images; layers and degrees are averaged. A lot is split into groups of at most ``max_compared + 1``
images (MuSc's subsets), fixed from content keys before anything is encoded. ``score_group`` encodes one group, fuses
its mutual map with the method's text map and a reference map where given, each standardised over the group, and puts
maps and image scores on the group's scale: a group's results depend on its own images alone, so a lot can be scored
group by group in flat memory, resumed at the next group and shared between processes by whole groups.
``score_batch`` runs every group of an in-memory batch.

Cost: for N images of P patches and width D, L layers and R degrees, each compared pair costs one (P x D) @ (D x P)
product per layer and degree (both directions from one product); time grows like N * max_compared and memory like
max_compared, not N.
"""

import hashlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .anomaly_maps import SIMILARITY_BLOCK, combine_layer_maps, scaled_sigma, upsample_patch_maps
from .class_names import UNNAMED_PRODUCT  # noqa: F401  (the name mutual results carry when none is given)
from .exceptions import ZSADError

# 1.4826 * MAD estimates a normal distribution's standard deviation.
MAD_TO_STD = 1.4826
# Values per map taken for the batch's median and spread (a strided sample: exact statistics of 200 maps at 518 px
# would sort 54 million values).
STANDARDISE_SAMPLE = 1 << 20


@dataclass(frozen=True)
class MutualSettings:
    """Every choice of mutual scoring; tags as in docs/METHODS.md ([paper], [code]: MuSc's public code, [choice]).

    Args:
        degrees: LNAMD aggregation degrees r: patch features averaged over r x r neighbourhoods [paper, code: 1, 3, 5].
        interval: the (low, high) fractions of the compared images, closest first, whose nearest-patch distances are
            averaged [code: MSM's topmin_min 0, topmin_max 0.3]; at least one image is always used.
        max_compared: at most this many other images per image [choice: 15; a batch of 32 is scored as two groups of 16,
            which keeps mutual scoring near half the vision passes' time (docs/PERFORMANCE.md); 31 scores it whole].
        image_score: "max" of the image's map [code] or "top_k_mean" of its highest ``top_fraction`` pixels [choice].
        top_fraction: share of pixels averaged by "top_k_mean" [choice: 1%].
        rescore: MuSc's RsCIN image re-scoring over the global embeddings' k nearest images of the group [code;
            choice: off].
        rescore_k: RsCIN's window sizes, each at least 1 [code: 1, 2, 3, its MVTec AD setting; its k = 0 means "off",
            which here is ``rescore=False``].
        text_weight: the method's text map's share in the fused standardised map; None: 0 for untrained and
            training-free methods (their text map is near chance and would drown the mutual map), 0.5 for trained
            ones [choice].
        reference_weight: share of a profile's reference map when one is given [choice: 1, as the mutual map].
        offset: robust standard deviations above the batch's typical value that map to 0.5 [choice: 3].
        temperature: standard deviations per unit of the logistic that maps them into (0, 1): the batch's median
            maps to sigmoid(-offset / temperature) = 0.18, and maps saturate in float16 only beyond ~20 [choice: 2].
        min_spread: least spread of a source when standardising, in its own units (distances, probabilities), so
            that a batch of near-identical images does not magnify noise [choice: 0.01].
        far_distance: a median nearest-patch distance above this means an image unlike the others (the distance of
            unit vectors with cosine 0.5) [choice].
        block: most similarities computed at once (64 MB in float32) [choice, the references' SIMILARITY_BLOCK].
    """

    degrees: tuple[int, ...] = (1, 3, 5)
    interval: tuple[float, float] = (0.0, 0.3)
    max_compared: int = 15
    image_score: str = "max"
    top_fraction: float = 0.01
    rescore: bool = False
    rescore_k: tuple[int, ...] = (1, 2, 3)
    text_weight: float | None = None
    reference_weight: float = 1.0
    offset: float = 3.0
    temperature: float = 2.0
    min_spread: float = 0.01
    far_distance: float = 1.0
    block: int = SIMILARITY_BLOCK

    def __post_init__(self):
        low, high = self.interval
        if not 0.0 <= low < high <= 1.0:
            raise ZSADError(f"The interval must satisfy 0 <= low < high <= 1, got {self.interval}.")
        if self.max_compared < 1:
            raise ZSADError(f"max_compared must be at least 1, got {self.max_compared}.")
        if not self.degrees or any(r < 1 or r % 2 == 0 for r in self.degrees):
            raise ZSADError(f"Aggregation degrees must be odd and positive (e.g. 1, 3, 5), got {self.degrees}.")
        if self.image_score not in ("max", "top_k_mean"):
            raise ZSADError(f"image_score must be 'max' or 'top_k_mean', got '{self.image_score}'.")
        if not self.rescore_k or any(k < 1 for k in self.rescore_k):
            raise ZSADError(f"Re-scoring window sizes must be at least 1, got {self.rescore_k}; to turn re-scoring off "
                            "(MuSc's k = 0), set rescore=False.")


@dataclass
class MutualScores:
    """``patch_maps`` (N, P) float32: each patch's interval-averaged nearest-patch distance (Euclidean, unit
    vectors, in [0, 2]), averaged over layers and degrees; ``compared`` (N,): how many images each was compared with."""

    patch_maps: torch.Tensor
    compared: torch.Tensor


def content_key(image) -> str:
    """A hash of a PIL image's decoded pixels: images with equal keys are exact duplicates."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def default_text_weight(settings: MutualSettings, trained: bool) -> float:
    """``settings.text_weight``, else 0.5 for a trained method and 0 for the others (their text map is near chance)."""
    if settings.text_weight is not None:
        return settings.text_weight
    return 0.5 if trained else 0.0


def check_batch(keys: Sequence[str]) -> None:
    """Refuse fewer than two images, or only copies of one."""
    if len(keys) < 2:
        raise ZSADError(f"Mutual scoring compares images with each other: give at least two images of the product, got {len(keys)}.")
    if len(set(keys)) < 2:
        raise ZSADError("All the images are identical; mutual scoring needs at least two different images of the product.")


def comparison_groups(keys: Sequence[str], max_compared: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices split into groups of at most ``max_compared + 1`` images (at least 2 each), independent of the input
    order: sorted by content key (then ``names``, which orders exact duplicates), dealt round-robin, so exact
    duplicates (equal keys) land in different groups. Each group lists its images in that sorted order, so its
    scores do not depend on the input order either."""
    count = len(keys)
    groups = max(1, min(math.ceil(count / (max_compared + 1)), count // 2))
    names = names if names is not None else [""] * count
    order = sorted(range(count), key=lambda i: (keys[i], names[i]))
    return [order[g::groups] for g in range(groups)]


def aggregate(tokens: torch.Tensor, degree: int) -> torch.Tensor:
    """LNAMD of one layer: (B, P, D) patch tokens on a square grid -> (B, P, D) unit vectors in the tokens' dtype.

    Layer norm over each image's whole (D, grid, grid) map without affine parameters, then the mean over r x r
    neighbourhoods with zero padding counted (MuSc's unfold + adaptive average pooling)."""
    batch, patches, width = tokens.shape
    grid = math.isqrt(patches)
    x = tokens.float().transpose(1, 2).reshape(batch, width, grid, grid)
    x = F.layer_norm(x, x.shape[1:])
    if degree > 1:  # separable: an r x r mean with zeros counted is a mean over r rows of means over r columns
        x = F.avg_pool2d(x, (degree, 1), stride=1, padding=(degree // 2, 0), count_include_pad=True)
        x = F.avg_pool2d(x, (1, degree), stride=1, padding=(0, degree // 2), count_include_pad=True)
    return F.normalize(x.flatten(2).transpose(1, 2), dim=-1).to(tokens.dtype)


def aggregated_layer(features_per_image: Sequence[torch.Tensor], layer: int, degree: int) -> torch.Tensor:
    """(N, P, D) LNAMD features of one layer, aggregated one image at a time (bounded temporaries)."""
    first = features_per_image[0][layer]
    out = torch.empty(len(features_per_image), *first.shape, dtype=first.dtype, device=first.device)
    for i, features in enumerate(features_per_image):
        out[i] = aggregate(features[layer][None], degree)[0]
    return out


def nearest_similarities(features: torch.Tensor, keys: Sequence[str], block: int) -> torch.Tensor:
    """(N, P, D) unit vectors -> (N, N, P) float32: [i, j, p] the largest cosine of patch p of image i with any patch
    of image j; -inf where j is i or an exact duplicate of it. Each pair is multiplied once (rows give i -> j,
    columns j -> i), in chunks of at most ``block`` similarities."""
    count, patches, _ = features.shape
    best = torch.full((count, count, patches), -math.inf, dtype=torch.float32, device=features.device)
    images_per_chunk = max(1, block // (patches * patches))
    rows_per_chunk = min(patches, max(1, block // (images_per_chunk * patches)))
    for i in range(count):
        others = [j for j in range(i + 1, count) if keys[j] != keys[i]]
        for start in range(0, len(others), images_per_chunk):
            chunk = others[start:start + images_per_chunk]
            memory = features[chunk].flatten(0, 1)
            for row in range(0, patches, rows_per_chunk):
                rows = slice(row, row + rows_per_chunk)
                similarity = (features[i, rows] @ memory.t()).float().view(-1, len(chunk), patches)
                best[i, chunk, rows] = similarity.amax(dim=2).t()
                best[chunk, i] = torch.maximum(best[chunk, i], similarity.amax(dim=0))
    return best


def interval_average(similarities: torch.Tensor, interval: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, N, P) nearest similarities (-inf: not compared) -> ((N, P) mean Euclidean distance over the compared
    images in the ``interval`` of fractions, closest first, (N,) how many images each was compared with)."""
    compared = torch.isfinite(similarities[:, :, 0]).sum(dim=1)
    distances = (2.0 - 2.0 * similarities).clamp_min(0.0).sqrt()  # -inf similarity -> inf distance, sorted last
    ordered = distances.sort(dim=1).values
    maps = torch.empty(similarities.shape[0], similarities.shape[2])
    for i, n in enumerate(compared.tolist()):
        low = int(n * interval[0])
        high = max(low + 1, int(n * interval[1]))
        maps[i] = ordered[i, low:high].mean(dim=0)
    return maps, compared


def mutual_scores(features_per_image: Sequence[torch.Tensor], settings: MutualSettings = MutualSettings(),
                  keys: Sequence[str] | None = None, progress: bool = False) -> MutualScores:
    """Mutual scores of a batch: ``features_per_image[i]`` is image i's (L, P, D) patch tokens of the tapped layers
    (class token dropped, P a square grid), any float dtype (the products run in it). ``keys`` mark exact duplicates
    (equal keys are never compared) and fix the groups; by default the hash of each image's features."""
    count = len(features_per_image)
    keys = list(keys) if keys is not None else [hashlib.sha256(f.float().cpu().numpy().tobytes()).hexdigest() for f in features_per_image]
    check_batch(keys)
    groups = comparison_groups(keys, settings.max_compared)
    layers = features_per_image[0].shape[0]
    patch_maps = torch.zeros(count, features_per_image[0].shape[1])
    compared = torch.zeros(count, dtype=torch.long)
    with tqdm(total=count * layers * len(settings.degrees), unit="image-layer", desc="mutual scoring", disable=not progress) as bar:
        for group in groups:
            group_keys = [keys[i] for i in group]
            for layer in range(layers):
                for degree in settings.degrees:
                    aggregated = aggregated_layer([features_per_image[i] for i in group], layer, degree)
                    similarities = nearest_similarities(aggregated, group_keys, settings.block)
                    maps, counts = interval_average(similarities, settings.interval)
                    patch_maps[group] += maps
                    compared[group] = counts
                    bar.update(len(group))
    if (compared == 0).any():
        raise ZSADError("Some images have only exact duplicates to be compared with; give at least two different images.")
    return MutualScores(patch_maps / (layers * len(settings.degrees)), compared)


def rescore(scores: torch.Tensor, embeddings: torch.Tensor, window_sizes: Sequence[int]) -> torch.Tensor:
    """MuSc's RsCIN: min-max normalised image scores (N,) averaged over each image's k most similar images by global
    embedding (N, E) (itself included), then averaged over the window sizes k."""
    spread = scores.max() - scores.min()
    if spread == 0:
        return scores
    normalised = (scores - scores.min()) / spread
    embeddings = F.normalize(embeddings.float(), dim=-1)
    similarity = embeddings @ embeddings.t()
    results = []
    for k in window_sizes:
        nearest = similarity.topk(min(k, len(scores)), dim=1).indices
        weights = torch.zeros_like(similarity).scatter_(1, nearest, similarity.gather(1, nearest))
        results.append((weights / weights.sum(dim=1, keepdim=True)) @ normalised)
    return torch.stack(results).mean(dim=0)


def standardise(values: torch.Tensor, min_spread: float = 0.0) -> torch.Tensor:
    """``values`` as robust z-scores over the whole batch: minus the median, over 1.4826 x the median absolute
    deviation, at least ``min_spread`` (most patches and images of a lot are normal, so defects barely move either)."""
    flat = values.float().flatten()
    sample = flat[::max(1, flat.numel() // STANDARDISE_SAMPLE)]
    median = sample.median()
    spread = MAD_TO_STD * (sample - median).abs().median()
    return (values.float() - median) / spread.clamp_min(max(min_spread, torch.finfo(torch.float32).eps))


def fused(sources: Sequence[tuple[torch.Tensor, float]], min_spread: float) -> torch.Tensor:
    """Weighted mean of standardised (maps, weight) sources; sources of weight 0 are skipped."""
    used = [(standardise(maps, min_spread), weight) for maps, weight in sources if weight > 0]
    return sum(weight * z for z, weight in used) / sum(weight for _, weight in used)


def to_unit(z: torch.Tensor, settings: MutualSettings) -> torch.Tensor:
    """Robust z-scores -> (0, 1): 0.5 at ``offset`` standard deviations above the batch's median, strictly increasing."""
    return torch.sigmoid((z - settings.offset) / settings.temperature)


def map_image_scores(maps: torch.Tensor, settings: MutualSettings) -> torch.Tensor:
    """(N, S, S) -> (N,): each map's maximum, or the mean of its highest ``top_fraction`` of pixels."""
    flat = maps.flatten(1)
    if settings.image_score == "max":
        return flat.amax(dim=1)
    return flat.topk(max(1, round(settings.top_fraction * flat.shape[1])), dim=1).values.mean(dim=1)


def far_notes(median_distances: torch.Tensor, far_distance: float) -> list[str | None]:
    """A note per image: for every image when the batch as a whole does not look like one product, else for each
    image unlike the others; None where there is nothing to say."""
    if float(median_distances.median()) > far_distance:
        return [f"These images do not look like one product (their patches' typical distance to the closest images' "
                f"is {float(median_distances.median()):.2f} > {far_distance}); mutual scoring assumes a lot of one product, "
                "so these scores say little."] * len(median_distances)
    return [f"This image looks unlike the others (typical patch distance {d:.2f} > {far_distance}); check that it shows "
            "the same product." if d > far_distance else None for d in median_distances.tolist()]


def mutual_map(patch_maps: torch.Tensor, grid_size: int, image_size: int, sigma: float) -> torch.Tensor:
    """(N, P) patch distances -> (N, S, S): upsampled and smoothed like the methods' maps."""
    return combine_layer_maps(upsample_patch_maps(patch_maps[:, None], grid_size, image_size), sigma)

@dataclass
class _Encoded:
    """One group encoded: its mutual maps and optional text and reference maps (g, S, S), and embeddings (g, E)."""

    mutual: torch.Tensor
    median_distance: torch.Tensor
    compared: torch.Tensor
    embeddings: torch.Tensor
    text: torch.Tensor | None
    reference: torch.Tensor | None
    method_details: list


@dataclass
class MutualBatch:
    """A scored group or batch, in its images' order: ``maps`` (N, S, S) and ``scores`` (N,) in (0, 1) on the group's
    scale, ``compared`` (N,) how many images each was compared with, ``median_distance`` (N,) its patches' typical
    distance to the closest images', ``notes`` on images unlike the others and the method's own ``method_details``."""

    maps: torch.Tensor
    scores: torch.Tensor
    compared: torch.Tensor
    median_distance: torch.Tensor
    notes: list[str | None]
    method_details: list


def score_batch(model, pictures: list, keys: list[str], name: str, text_weight: float, settings: MutualSettings = MutualSettings(),
                batch_size: int = 8, progress: bool = False, turn: Callable[[], AbstractContextManager] = nullcontext,
                reference: Callable | None = None, encode: Callable | None = None) -> MutualBatch:
    """Every group of ``pictures`` (PIL images, keys from ``content_key``) scored by ``score_group``, in input order."""
    check_batch(keys)
    groups = comparison_groups(keys, settings.max_compared)
    scored = [score_group(model, [pictures[i] for i in group], [keys[i] for i in group], name, text_weight, settings, batch_size,
                          progress, turn, reference, encode) for group in groups]
    position = torch.empty(len(keys), dtype=torch.long)
    position[torch.tensor([i for group in groups for i in group])] = torch.arange(len(keys))

    def gathered(field: str) -> torch.Tensor:
        return torch.cat([getattr(batch, field) for batch in scored])[position]

    def listed(field: str) -> list:
        values = [value for batch in scored for value in getattr(batch, field)]
        return [values[p] for p in position.tolist()]

    return MutualBatch(gathered("maps"), gathered("scores"), gathered("compared"), gathered("median_distance"), listed("notes"),
                       listed("method_details"))


def score_group(model, pictures: list, keys: list[str], name: str, text_weight: float, settings: MutualSettings = MutualSettings(),
                batch_size: int = 8, progress: bool = False, turn: Callable[[], AbstractContextManager] = nullcontext,
                reference: Callable | None = None, encode: Callable | None = None) -> MutualBatch:
    """One group's ``pictures`` (PIL images, keys from ``content_key``) scored against each other with ``model``'s
    backbone at its input size and tapped layers, whatever ``settings.max_compared``; the method's text map fused in
    with ``text_weight`` and ``reference(features, sigma)``'s map (g, S, S) with ``settings.reference_weight`` when
    given, each standardised over the group, then image scores (re-scored by RsCIN when asked) and maps on the
    group's scale. Each encoding batch and the scoring run inside ``turn()``; ``encode(pixel_values)`` runs the vision
    pass (default ``model.encode_image``; zsad passes its engine's)."""
    check_batch(keys)
    encoded = _encode_group(model, pictures, keys, name, text_weight, settings, batch_size, progress, turn, reference,
                            encode or model.encode_image)
    sources = [(encoded.mutual, 1.0)]
    if text_weight > 0:
        sources.append((encoded.text, text_weight))
    if reference is not None:
        sources.append((encoded.reference, settings.reference_weight))
    z_maps = fused(sources, settings.min_spread)
    raw_scores = map_image_scores(z_maps, settings)
    if settings.rescore:
        raw_scores = rescore(raw_scores, encoded.embeddings, settings.rescore_k)
    return MutualBatch(to_unit(z_maps, settings), to_unit(standardise(raw_scores), settings), encoded.compared,
                       encoded.median_distance, far_notes(encoded.median_distance, settings.far_distance), encoded.method_details)


def _encode_group(model, pictures: list, keys: list[str], name: str, text_weight: float, settings: MutualSettings,
                  batch_size: int, progress: bool, turn: Callable[[], AbstractContextManager], reference: Callable | None,
                  encode: Callable) -> _Encoded:
    """Encode one group (in batches), run the method's text map and the reference map where they are used, and score
    the group's images against each other."""
    config = model.config
    sigma = scaled_sigma(config.smoothing_sigma, config.image_size, config.smoothing_reference_size)
    device = model.require_backbone().device
    patch_tokens, embeddings, text, references, details = [], [], [], [], []
    for start in range(0, len(pictures), batch_size):
        batch = pictures[start:start + batch_size]
        pixel_values = model.image_processor.pixel_values(batch)
        with turn(), torch.inference_mode():
            features = encode(pixel_values.to(device))
            if text_weight > 0:
                output = model(image_features=features, class_names=[name] * len(batch))
                text.append(output.anomaly_map.float().cpu())
                details += [output.image_details(i) for i in range(len(batch))]
            if reference is not None:
                references.append(reference(features, sigma).cpu())
        patch_tokens += list(torch.stack([features.patch_tokens(i) for i in range(len(features.layers))], dim=1))
        embeddings.append(features.image_embeds.float().cpu())
    with turn(), torch.inference_mode():
        scores = mutual_scores(patch_tokens, replace(settings, max_compared=len(pictures) - 1), keys, progress)
    mutual = mutual_map(scores.patch_maps, features.grid_size, config.image_size, sigma)
    return _Encoded(mutual, scores.patch_maps.median(dim=1).values, scores.compared, torch.cat(embeddings),
                    torch.cat(text) if text else None, torch.cat(references) if references else None,
                    details or [None] * len(pictures))
