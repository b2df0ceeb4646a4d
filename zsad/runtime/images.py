"""Reading any image a user may bring, and turning images into model input.

``load_image`` accepts paths, bytes, PIL images and numpy arrays and always returns an upright 8-bit RGB
PIL image, or raises one ``ZSADError`` saying what is wrong (unreadable, truncated, too large, too small).
The implementation lives in ``zsad/modeling/image_processing_zsad.py``: the pipeline saved with every checkpoint
reads images with the same code; ``read_image`` also bounds the longest side (decoding large JPEGs at reduced
size) and tells the original size. Importing it does not import torch (``zsad.deploy.runtime`` uses it without torch).
"""

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..modeling.exceptions import ZSADError
from ..modeling.image_processing_zsad import (
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    LoadedImage,
    bounded,
    bounded_size,
    load_image,
    normalised_pixels,
    read_image,
    to_pixel_values,
)

# The file suffixes zsad reads as images, everywhere (folders given to predict, dataset readers).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(sources: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files (by suffix, sorted; files only, so a folder named ``x.png`` is not one)
    inside any folder among them."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files.extend(sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()))
        else:
            files.append(source)
    return files


def header_size(source, name: str) -> tuple[int, int]:
    """(width, height) as an image file's header states them, read without decoding the pixels; ``source`` is a
    path or a binary file object. A file that is not an image raises ``ZSADError`` naming ``name``."""
    try:
        with Image.open(source) as image:
            return image.size
    except Image.DecompressionBombError:
        # Pillow refuses to open it at all; read_image reads the size past Pillow's limit and refuses it by name.
        if hasattr(source, "seek"):
            source.seek(0)
        read_image(source, name=name)
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise ZSADError(f"Not a readable image '{name}'; use a PNG, JPEG, BMP or TIFF file.") from error


__all__ = [
    "IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE", "LoadedImage", "bounded", "bounded_size", "header_size", "image_files", "load_image",
    "normalised_pixels", "read_image", "to_pixel_values",
]
