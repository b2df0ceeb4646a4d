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
    kernel = gaussian_kernel1d(sigma).to(maps.device, maps.dtype)
    radius = kernel.numel() // 2
    # Reflect padding needs the pad to be smaller than the side; tiny maps are padded by repeating.
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


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
    kernel = gaussian_kernel1d(sigma, truncate).to(maps.device, maps.dtype)
    radius = kernel.numel() // 2
    height, width = maps.shape[-2:]
    x = maps.unsqueeze(1)
    x = F.conv2d(x.index_select(3, reflected_indices(width, radius).to(maps.device)), kernel.view(1, 1, 1, -1))
    x = F.conv2d(x.index_select(2, reflected_indices(height, radius).to(maps.device)), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)
