"""Heat-map overlays and result figures."""

import numpy as np
from matplotlib import colormaps
from PIL import Image


def overlay_heatmap(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """Blend a [0, 1] map (H, W) of the image's own size over the RGB image with a matplotlib colormap."""
    heat = colormaps[colormap](np.clip(anomaly_map, 0.0, 1.0))[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1.0 - alpha) * base + alpha * heat
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8))
