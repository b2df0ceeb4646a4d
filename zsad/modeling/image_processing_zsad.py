"""Reading a user's image, turning images into model input, and a model's map back into a mask at the image's size.

The one implementation for zsad (``zsad.runtime.images``, ``zsad.detection.detector``) and for the pipeline every checkpoint carries
(``pipeline_zsad.py``), so both read, resize and threshold images the same way.

``load_image`` accepts paths, bytes, PIL images and numpy arrays and always returns an upright 8-bit RGB
PIL image, or raises one ``ZSADError`` saying what is wrong (unreadable, truncated, too large, too small).

Importing this module does not import torch (the two functions that return or take tensors import it when called):
``zsad.deploy.runtime`` reads and normalises images with it in processes without torch.
"""

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .exceptions import ZSADError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_THRESHOLD = 0.5
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; larger files are refused before decoding (decompression bombs)
MIN_IMAGE_SIDE = 16
# The largest input side of zsad's models (518 px): bounding an image's longest side for display never takes its short
# side below this, so the model still gets at least the resolution it resizes to.
KEPT_SHORT_SIDE = 518


@dataclass
class LoadedImage:
    """``image``: upright 8-bit RGB, its longest side bounded when asked; ``original_size``: the upright (width,
    height) of the file itself."""

    image: Image.Image
    original_size: tuple[int, int]


def load_image(source, name: str | None = None) -> Image.Image:
    """An upright (EXIF orientation applied) 8-bit RGB image from a path, bytes, PIL image or array.

    ``name`` is how errors call the image (e.g. the file name a user uploaded, not the server's copy of it)."""
    return read_image(source, name=name).image


def read_image(source, name: str | None = None, max_side: int | None = None) -> LoadedImage:
    """``load_image`` (a ``LoadedImage`` is taken as it is), with the longest side at most ``max_side`` pixels when
    given: JPEGs are decoded at a reduced scale (1/2, 1/4 or 1/8, Pillow's ``draft``) where that stays above the
    bound, then resized (antialiased)."""
    if isinstance(source, LoadedImage):
        return LoadedImage(read_image(source.image, name, max_side).image, source.original_size)
    name = name or (str(source) if isinstance(source, (str, Path)) else None)
    image = _open(source, name)
    width, height = image.size
    called = f"The image '{name}' " if name else "The image "
    if width * height > MAX_IMAGE_PIXELS:
        raise ZSADError(
            f"{called}is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; "
            "downscale it (anomaly maps are computed at 518 px anyway)."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ZSADError(f"{called}is only {width}x{height} pixels; use an image at least {MIN_IMAGE_SIDE} px on each side.")
    turned = _exif_orientation(image) in (5, 6, 7, 8)  # stored sideways: upright width and height swap
    original_size = (height, width) if turned else (width, height)
    try:
        if max_side and max(width, height) > max_side and image.format == "JPEG":
            image.draft("RGB", bounded_size((width, height), max_side))
        image = _to_rgb(ImageOps.exif_transpose(image))
        return LoadedImage(bounded(image, max_side) if max_side else image, original_size)
    except (OSError, ValueError, SyntaxError) as error:
        raise ZSADError(f"{called}could not be decoded ({error}); the file may be truncated or corrupt.") from error


def bounded(image: Image.Image, side: int) -> Image.Image:
    """``image`` with its longest side at most ``side`` pixels, short side kept as ``bounded_size`` says (one-channel
    masks resized nearest, staying binary)."""
    if bounded_size(image.size, side) == image.size:
        return image
    resample = Image.Resampling.NEAREST if image.mode == "L" else Image.Resampling.BICUBIC
    return image.resize(bounded_size(image.size, side), resample, reducing_gap=2.0)


def bounded_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled down so that its longest side is ``max_side`` (aspect kept, never enlarged), but its short side
    never below ``KEPT_SHORT_SIDE`` (or its own length, when shorter): an elongated image (a line-scan's 5000x64)
    keeps the rows the model sees and is scored as at full size. A bound under ``KEPT_SHORT_SIDE`` asks for less
    than the model sees anyway; the short side then stays at least ``MIN_IMAGE_SIDE``, so the result is never refused."""
    floor = KEPT_SHORT_SIDE if max_side >= KEPT_SHORT_SIDE else MIN_IMAGE_SIDE
    scale = min(1.0, max(max_side / max(size), floor / min(size)))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except (OSError, ValueError, SyntaxError, TypeError):
        return 1


def _open(source, name: str | None) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    if source is None:
        raise ZSADError("No image was given; upload or pass an image.")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)) and not Path(source).is_file():
        raise ZSADError(f"Image file not found: {name}")
    try:
        # Pillow's own bomb check (process-wide Image.MAX_IMAGE_PIXELS, left as the user set it) may refuse first;
        # ours, stricter by default, follows in read_image from the header alone.
        return Image.open(source)
    except Image.DecompressionBombError as error:
        called = f"The image '{name}'" if name else "The image"
        raise ZSADError(f"{called} is too large to decode safely ({error}); downscale it to no more than "
                        f"{MAX_IMAGE_PIXELS:,} pixels.") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        reason = str(error).replace(str(source), name) if name and isinstance(source, (str, Path)) else str(error)
        called = f" '{name}'" if name else ""
        raise ZSADError(f"Not a readable image{called} ({reason}); use a PNG, JPEG, BMP or TIFF file.") from error


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


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
PROCESSOR_FILE = "preprocessor_config.json"


def normalised_pixels(images: list[Image.Image], size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                      resample: str = "bicubic") -> np.ndarray:
    """(B, 3, size, size) float32 normalised model input: resize of the whole image (no crop), as in METHODS.md."""
    batch = np.stack([np.asarray(image.resize((size, size), RESAMPLING[resample]), dtype=np.float32) for image in images])
    pixels = batch.transpose(0, 3, 1, 2) / np.float32(255.0)
    return (pixels - np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)


def to_pixel_values(images: list[Image.Image], size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resample: str = "bicubic"):
    """``normalised_pixels`` as a torch tensor (the models' input)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(normalised_pixels(images, size, mean, std, resample)))


def resize_map(anomaly_map, size: tuple[int, int]) -> np.ndarray:
    """(S, S) map (array or CPU tensor) -> (H, W) float32 map in [0, 1] for an image of PIL ``size`` (W, H).

    Bilinear with half-pixel centres and edge clamping, the result of torch's ``interpolate(mode="bilinear",
    align_corners=False)``, in numpy so the torch-free runtime resizes as the detector does. Pillow's bilinear
    differs: it averages over the source pixels when shrinking."""
    width, height = size
    source = np.asarray(anomaly_map, dtype=np.float32)
    low, high, weight = _bilinear_taps(width, source.shape[1])
    columns = source[:, low] * (1.0 - weight) + source[:, high] * weight  # the small map first: rows are gathered whole
    low, high, weight = _bilinear_taps(height, source.shape[0])
    resized = columns[low] * (1.0 - weight)[:, None]
    resized += columns[high] * weight[:, None]
    return np.clip(resized, 0.0, 1.0, out=resized)


def _bilinear_taps(length: int, source_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position along one axis: the two source indices and the second one's weight."""
    position = np.maximum((np.arange(length) + 0.5) * (source_length / length) - 0.5, 0.0)
    low = np.minimum(position.astype(np.int64), source_length - 1)
    return low, np.minimum(low + 1, source_length - 1), (position - low).astype(np.float32)


@dataclass(frozen=True)
class ZSADImageProcessor:
    """A model's pre-processing (images to normalised input) and post-processing (its map to the image's size, a
    mask, a verdict), as transformers' image processors pair them; saved as ``preprocessor_config.json`` next to
    checkpoints and exported graphs and read back from there. Needs no torch except for ``pixel_values``.

    Args:
        size: the model's square input side.
        image_mean, image_std: the backbone's normalisation (per RGB channel).
        resample: how images are resized to ``size``: "bicubic" (the methods') or "bilinear".
    """

    size: int
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"

    def __post_init__(self):
        if self.resample not in RESAMPLING:
            raise ZSADError(f"Unknown resample '{self.resample}'; use one of {sorted(RESAMPLING)}.")
        object.__setattr__(self, "image_mean", tuple(float(value) for value in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(value) for value in self.image_std))

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        """(B, 3, size, size) float32 normalised input (numpy)."""
        return normalised_pixels(images, self.size, self.image_mean, self.image_std, self.resample)

    def pixel_values(self, images: list[Image.Image]):
        """``preprocess`` as a torch tensor."""
        return to_pixel_values(images, self.size, self.image_mean, self.image_std, self.resample)

    @staticmethod
    def postprocess(anomaly_map, size: tuple[int, int], pixel_threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(the map resized to PIL ``size``, its mask at ``pixel_threshold``); the map may be an array or a CPU tensor."""
        resized = resize_map(anomaly_map, size)
        return resized, resized >= pixel_threshold

    def to_dict(self) -> dict:
        return {"size": self.size, "image_mean": list(self.image_mean), "image_std": list(self.image_std), "resample": self.resample}

    def save_pretrained(self, directory) -> Path:
        path = Path(directory) / PROCESSOR_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory) -> "ZSADImageProcessor":
        path = Path(directory) / PROCESSOR_FILE
        if not path.is_file():
            raise ZSADError(f"{directory} has no {PROCESSOR_FILE}; save the model or export it again with this zsad version.")
        return cls(**json.loads(path.read_text()))


def check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ZSADError(f"The threshold must be a number between 0 and 1, got {threshold!r}.")


def verdict(score: float, threshold: float) -> str:
    """"anomalous" when the image score reaches the threshold, else "normal"; a non-finite score is a ZSADError, never
    a verdict (NaN compares false with everything, so it would read "normal")."""
    if not is_finite_score(score):
        raise ZSADError(non_finite_message(score))
    return "anomalous" if score >= threshold else "normal"


def is_finite_score(score) -> bool:
    return math.isfinite(float(score))


def non_finite_message(score) -> str:
    return (f"the model returned {float(score)} as the image score, so there is no verdict; its weights or the product "
            "profile's scale are broken: load the checkpoint and profile again, or rebuild them")


def mask_image(mask: np.ndarray) -> Image.Image:
    """A boolean (H, W) mask as a black/white 8-bit image."""
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
