"""From patch features and (normal, abnormal) text features to smoothed pixel maps (METHODS.md, Common protocol)."""

import torch
import torch.nn.functional as F

# Largest block of patch similarities computed at once (reference images' nearest patches, mutual scoring): 2^24
# values are 64 MB in float32, whatever the number of images compared.
SIMILARITY_BLOCK = 1 << 24


def state_logits(features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Scaled cosine similarities of L2-normalised ``features`` (B, N, P) or (B, P) against text pairs.

    ``text_features`` is (2, P) shared by the batch or (B, 2, P) per image; the result has a trailing
    dimension of 2 (normal, abnormal). Computed in float32 whatever the backbone's precision: a logit
    scale of 100 magnifies bfloat16 rounding of the cosines.
    """
    features, text_features = features.float(), text_features.float()
    if text_features.dim() == 2:
        return logit_scale * features @ text_features.t()
    if features.dim() == 2:
        return logit_scale * torch.einsum("bp,bsp->bs", features, text_features)
    return logit_scale * torch.einsum("bnp,bsp->bns", features, text_features)


def patch_state_probs(patch_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """2-way softmax per patch: (B, N, P) normalised features -> (B, 2, N) (normal, abnormal) probabilities."""
    return state_logits(patch_features, text_features, logit_scale).softmax(dim=-1).transpose(1, 2)


def upsample_patch_maps(patch_maps: torch.Tensor, grid_size: int, image_size: int) -> torch.Tensor:
    """(B, C, N) patch values on a square grid -> (B, C, image_size, image_size), bilinear."""
    batch, channels, _ = patch_maps.shape
    grid = patch_maps.reshape(batch, channels, grid_size, grid_size)
    return F.interpolate(grid.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius round(truncate * sigma), as scipy.ndimage.gaussian_filter uses."""
    radius = max(int(truncate * sigma + 0.5), 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps with mirrored borders (scipy mode='mirror').

    Done in torch rather than scipy so batches stay on the model's device without a numpy round trip.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma)
    radius = kernel.numel() // 2
    # Mirroring needs the pad to be smaller than the side (as torch's 'reflect' padding); tiny maps repeat their edge.
    pad = mirrored_indices if radius < min(maps.shape[-2:]) else repeated_edge_indices
    return separable_blur(maps, kernel, pad)


def mirrored_indices(size: int, radius: int) -> torch.Tensor:
    """Indices of a side of ``size`` padded by ``radius`` < ``size`` on each end, mirrored (c b | a b c d | c b)."""
    period = torch.arange(-radius, size + radius).abs()
    return torch.where(period < size, period, 2 * (size - 1) - period)


def repeated_edge_indices(size: int, radius: int) -> torch.Tensor:
    """Indices of a side of ``size`` padded by ``radius`` on each end with its edge values (a a | a b c | c c)."""
    return torch.arange(-radius, size + radius).clamp(0, size - 1)


def blur_matrix(size: int, kernel: torch.Tensor, padded_indices: torch.Tensor) -> torch.Tensor:
    """(size, size) matrix M such that M @ x is ``kernel`` (odd length) run along a side x of ``size`` padded as
    ``padded_indices`` (size + len(kernel) - 1 indices into x) says."""
    radius = kernel.numel() // 2
    rows = torch.arange(size)[:, None].expand(-1, 2 * radius + 1)
    band = torch.zeros(size, size + 2 * radius, dtype=kernel.dtype)
    band[rows, rows + torch.arange(2 * radius + 1)] = kernel
    return torch.zeros(size, size, dtype=kernel.dtype).index_add_(1, padded_indices, band)


def separable_blur(maps: torch.Tensor, kernel: torch.Tensor, padded_indices) -> torch.Tensor:
    """(B, H, W) maps smoothed by ``kernel`` along both sides, each padded by ``padded_indices(side, radius)``.

    As two matrix products rather than two convolutions: a 1-channel convolution runs at about 1 GFLOP/s on CPUs
    (11 ms for a 518 x 518 map against 3 ms, full-size maps of the baseline), where a matrix product runs at the CPU's
    full rate; the sums are the same up to float rounding."""
    radius = kernel.numel() // 2
    height, width = maps.shape[-2:]
    matrices = {side: blur_matrix(side, kernel, padded_indices(side, radius)).to(maps.device, maps.dtype)
                for side in {height, width}}  # one for a square map, as the models' maps are
    return matrices[height] @ maps @ matrices[width].T


def scaled_sigma(sigma_at_reference: float, image_size: int, reference_size: int) -> float:
    """Smoothing width in pixels at ``image_size`` for a width given at ``reference_size`` (4 px at 518)."""
    return sigma_at_reference * image_size / reference_size


def combine_layer_maps(layer_maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Average (B, L, H, W) per-layer abnormal maps over layers, then smooth."""
    return gaussian_blur(layer_maps.mean(dim=1), sigma)


def image_scores(global_probs: torch.Tensor, anomaly_map: torch.Tensor, map_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Image score = (1 - w) * global abnormal probability + w * max of the smoothed map; returns (score, map max)."""
    map_scores = anomaly_map.flatten(1).amax(dim=1)
    return (1.0 - map_weight) * global_probs + map_weight * map_scores, map_scores



def reflected_indices(size: int, radius: int) -> torch.Tensor:
    """Indices of a side of ``size`` padded by ``radius`` on each end with scipy.ndimage's 'reflect' border
    (d c b a | a b c d | d c b a), repeated as often as the radius needs."""
    period = torch.arange(-radius, size + radius).remainder(2 * size)
    return torch.where(period < size, period, 2 * size - 1 - period)


def gaussian_blur_reflect(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(map, sigma)`` of each (H, W) map of a (B, H, W) batch: its kernel (radius
    round(truncate * sigma)) and its default 'reflect' border, which torch's padding modes lack ('reflect' there is
    scipy's 'mirror'). In torch so that batches stay on the model's device and in the exported graph."""
    if sigma <= 0:
        return maps
    return separable_blur(maps, gaussian_kernel1d(sigma, truncate), reflected_indices)
