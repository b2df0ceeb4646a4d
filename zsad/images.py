"""Reading any image a user may bring, and turning images into model input.

``load_image`` accepts paths, bytes, PIL images and numpy arrays and always returns an upright 8-bit RGB
PIL image, or raises one ``ZSADError`` saying what is wrong (unreadable, truncated, too large, too small).
"""

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ZSADError
from .modeling.clip_backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# The file suffixes zsad reads as images, everywhere (folders given to predict, dataset readers).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; larger files are refused before decoding (decompression bombs)
MIN_IMAGE_SIDE = 16


def image_files(sources: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files (by suffix, sorted) inside any folder among them."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files.extend(sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(source)
    return files


def load_image(source) -> Image.Image:
    """An upright (EXIF orientation applied) 8-bit RGB image from a path, bytes, PIL image or array."""
    image = _open(source)
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ZSADError(
            f"The image is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; "
            "downscale it (anomaly maps are computed at 518 px anyway)."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ZSADError(f"The image is only {width}x{height} pixels; use an image at least {MIN_IMAGE_SIDE} px on each side.")
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise ZSADError(f"The image could not be decoded ({error}); the file may be truncated or corrupt.") from error


def _open(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    if source is None:
        raise ZSADError("No image was given; upload or pass an image.")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)) and not Path(source).is_file():
        raise ZSADError(f"Image file not found: {source}")
    try:
        # Pillow's own bomb check raises past 2x its limit; ours (above) is stricter and reads only the header.
        with _pillow_limit_disabled():
            return Image.open(source)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ZSADError(f"Not a readable image ({error}); use a PNG, JPEG, BMP or TIFF file.") from error


class _pillow_limit_disabled:
    def __enter__(self):
        self.saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self.saved


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ZSADError(f"An image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}.")
    if array.dtype != np.uint8:
        array = _scale_to_uint8(array.astype(np.float64), np.issubdtype(array.dtype, np.integer), array.dtype)
    return Image.fromarray(array)


def _scale_to_uint8(values: np.ndarray, is_integer: bool, dtype) -> np.ndarray:
    """Integer images are scaled by their type's range (16-bit: /257); float images are taken as [0, 1]."""
    top = np.iinfo(dtype).max if is_integer else 1.0
    return np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: 16/32-bit grey scaled to 8 bit, alpha composited on white, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image, dtype=np.float64), True, np.uint16)).convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 32-bit integer files usually hold 16-bit data; scale by the data's own range class.
        top = 1.0 if image.mode == "F" else (65535.0 if values.max() > 255 else 255.0)
        return Image.fromarray(np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_pixel_values(images: list[Image.Image], size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """(B, 3, size, size) normalised model input: bicubic resize of the whole image (no crop), as in METHODS.md."""
    batch = np.stack([np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) for image in images])
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).div_(255.0)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean) / std
