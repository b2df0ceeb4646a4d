"""A synthetic anomaly-detection dataset in the MVTec-AD layout, for tests, demos and training smoke runs.

Procedural textures (``fabric``, ``wood``, ``tile``, ``grid``) and simple objects on a plain background
(``disk``, ``plate``, ``capsule``, ``tube``) with realistic defect shapes and exact masks: scratches, holes,
stains, cracks, missing parts (objects only), cut-paste patches and colour shifts. Every defect changes colour
or texture visibly, so that a trained head can learn them and transfer to held-out categories.

```python
>>> from zsad.data.synthetic import generate, CATEGORIES
>>> root = generate("/tmp/synthetic", categories=["wood", "capsule"], num_good=4, num_defective=6, seed=0)
>>> sorted(p.name for p in (root / "wood" / "test").iterdir())
['color', 'crack', 'cut_paste', 'good', 'hole', 'scratch', 'stain']
```

Written files: ``<cat>/train/good/000.png``, ``<cat>/test/good/000.png``, ``<cat>/test/<defect>/000.png`` and
``<cat>/ground_truth/<defect>/000_mask.png`` (0 / 255). The same arguments always give the same pixels.
"""

import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..errors import ZSADError
from .readers import requested_names

TEXTURES = ("fabric", "wood", "tile", "grid")
OBJECTS = ("disk", "plate", "capsule", "tube")
CATEGORIES = TEXTURES + OBJECTS
TEXTURE_DEFECTS = ("scratch", "hole", "stain", "crack", "cut_paste", "color")
OBJECT_DEFECTS = ("scratch", "hole", "stain", "crack", "missing", "cut_paste", "color")
# Written at the root, so evaluations and model cards label results on it as synthetic, never as a benchmark split.
SYNTHETIC_MARKER = "zsad_synthetic.json"
MIN_DEFECT_PIXELS = 12  # a drawn defect that lands (almost) outside the object is drawn again


def generate(
    root: str | Path,
    categories: Sequence[str] | None = None,
    num_good: int = 4,
    num_defective: int = 6,
    image_size: int = 256,
    seed: int = 0,
    num_train_good: int = 4,
) -> Path:
    """Write ``num_train_good`` training images and ``num_good`` + ``num_defective`` test images per category
    (defect types in turn) under ``root`` in the MVTec-AD layout; return ``root`` as a ``Path``."""
    root = Path(root)
    categories = _check_categories(categories)
    if image_size < 32:
        raise ZSADError(f"image_size must be at least 32 pixels, got {image_size}.")
    for category in categories:
        _write_category(root / category, category, num_good, num_defective, image_size, seed, num_train_good)
    marker = {"generator": "zsad.data.synthetic", "categories": list(categories), "seed": seed, "image_size": image_size}
    (root / SYNTHETIC_MARKER).write_text(json.dumps(marker) + "\n")
    return root


def is_synthetic(root) -> bool:
    """Whether a dataset root was written by ``generate`` (its results are not a benchmark's)."""
    return root is not None and (Path(root) / SYNTHETIC_MARKER).is_file()


def defect_types(category: str) -> tuple[str, ...]:
    """The defect folders a category gets (``missing`` needs an object with a background)."""
    return TEXTURE_DEFECTS if category in TEXTURES else OBJECT_DEFECTS


def _check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(requested_names(categories, CATEGORIES, "the synthetic generator"))


def _write_category(folder: Path, category: str, num_good: int, num_defective: int, size: int, seed: int, num_train: int):
    for index in range(num_train):
        image, _ = _normal_image(category, size, _rng(seed, category, "train", index))
        _save(image, folder / "train" / "good" / f"{index:03d}.png")
    for index in range(num_good):
        image, _ = _normal_image(category, size, _rng(seed, category, "good", index))
        _save(image, folder / "test" / "good" / f"{index:03d}.png")
    kinds = defect_types(category)
    counts = dict.fromkeys(kinds, 0)
    for index in range(num_defective):
        kind = kinds[index % len(kinds)]
        rng = _rng(seed, category, kind, counts[kind])
        image, region = _normal_image(category, size, rng)
        image, mask = _add_defect(image, region, kind, rng)
        name = f"{counts[kind]:03d}"
        _save(image, folder / "test" / kind / f"{name}.png")
        _save(mask.astype(np.float32), folder / "ground_truth" / kind / f"{name}_mask.png")
        counts[kind] += 1


def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """One generator per image, independent of which other categories or counts were asked for."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)).save(path)


# --- normal images: (H, W, 3) floats in [0, 1] and the object's region (all True for textures) ---


def _normal_image(category: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image, region = _PAINTERS[category](xx, yy, rng)
    image = image + rng.normal(0.0, 0.015, image.shape)  # sensor noise
    return np.clip(image, 0.0, 1.0).astype(np.float32), region


def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-scale smooth noise (sigma in pixels)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / (np.abs(noise).max() + 1e-8)


def _colour(rng: np.random.Generator, base: Sequence[float], jitter: float = 0.03) -> np.ndarray:
    return np.clip(np.asarray(base) + rng.normal(0.0, jitter, 3), 0.0, 1.0)


def _shade(pattern: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Blend two colours by a [0, 1] pattern (H, W) -> (H, W, 3)."""
    return dark + pattern[..., None] * (light - dark)


def _fabric(xx, yy, rng):
    frequency = rng.uniform(28, 34) * np.pi
    weave = 0.5 + 0.25 * np.sin(frequency * xx + rng.uniform(0, 6)) * np.sign(np.sin(frequency * yy)) + 0.25 * np.sin(frequency * yy)
    pattern = np.clip(weave + 0.1 * _smooth_noise(xx.shape, rng, 3), 0, 1)
    return _shade(pattern, _colour(rng, (0.15, 0.22, 0.45)), _colour(rng, (0.35, 0.45, 0.75))), np.ones(xx.shape, bool)


def _wood(xx, yy, rng):
    warp = 0.08 * _smooth_noise(xx.shape, rng, xx.shape[0] / 10)
    rings = 0.5 + 0.5 * np.sin((xx + warp) * rng.uniform(20, 26) * np.pi + rng.uniform(0, 6))
    pattern = np.clip(rings**2 + 0.08 * _smooth_noise(xx.shape, rng, 1.5), 0, 1)
    return _shade(pattern, _colour(rng, (0.45, 0.28, 0.14)), _colour(rng, (0.75, 0.55, 0.33))), np.ones(xx.shape, bool)


def _tile(xx, yy, rng):
    count = 4
    cell_x, cell_y = xx * count, yy * count
    grout = (np.minimum(cell_x % 1, 1 - cell_x % 1) < 0.04) | (np.minimum(cell_y % 1, 1 - cell_y % 1) < 0.04)
    tile_shade = rng.uniform(-0.04, 0.04, (count, count))[np.minimum(cell_y.astype(int), count - 1), np.minimum(cell_x.astype(int), count - 1)]
    speckle = 0.06 * _smooth_noise(xx.shape, rng, 1.0)
    image = _colour(rng, (0.78, 0.76, 0.70)) + (tile_shade + speckle)[..., None]
    image[grout] = _colour(rng, (0.45, 0.44, 0.42))
    return image, np.ones(xx.shape, bool)


def _grid(xx, yy, rng):
    frequency = rng.uniform(9, 11)
    line = lambda t: np.exp(-(((t * frequency + rng.uniform(0, 1)) % 1 - 0.5) ** 2) / 0.01)  # noqa: E731
    pattern = np.clip(np.maximum(line(xx), line(yy)) + 0.05 * _smooth_noise(xx.shape, rng, 2), 0, 1)
    return _shade(pattern, _colour(rng, (0.10, 0.10, 0.11)), _colour(rng, (0.70, 0.72, 0.75))), np.ones(xx.shape, bool)


def _on_background(xx, rng, region: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    background = _colour(rng, (0.12, 0.12, 0.13), 0.01) + 0.02 * _smooth_noise(xx.shape, rng, 8)[..., None]
    return np.where(region[..., None], body, background), region


def _disk(xx, yy, rng):
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03, 2)
    radius = np.hypot(xx - cx, yy - cy)
    outer = rng.uniform(0.33, 0.37)
    region = radius < outer
    rings = 0.6 + 0.25 * np.cos(radius * 90) + 0.15 * (1 - radius / outer)
    return _on_background(xx, rng, region, _shade(np.clip(rings, 0, 1), _colour(rng, (0.35, 0.36, 0.40)), _colour(rng, (0.80, 0.81, 0.85))))


def _plate(xx, yy, rng):
    x0, y0 = 0.15 + rng.uniform(-0.03, 0.03, 2)
    region = (xx > x0) & (xx < x0 + 0.7) & (yy > y0) & (yy < y0 + 0.7)
    body = np.broadcast_to(_colour(rng, (0.10, 0.42, 0.20)), xx.shape + (3,)).copy()
    gold = _colour(rng, (0.85, 0.70, 0.25))
    for px in (0.2, 0.5, 0.8):
        for py in (0.25, 0.75):
            body[np.hypot(xx - (x0 + 0.7 * px), yy - (y0 + 0.7 * py)) < 0.04] = gold
    return _on_background(xx, rng, region, body)


def _capsule(xx, yy, rng):
    cy = 0.5 + rng.uniform(-0.03, 0.03)
    half_length, thickness = rng.uniform(0.24, 0.27), rng.uniform(0.13, 0.15)
    along = np.clip(xx - 0.5, -half_length, half_length)
    region = np.hypot(xx - 0.5 - along, yy - cy) < thickness
    left = xx < 0.5
    body = np.where(left[..., None], _colour(rng, (0.80, 0.15, 0.15)), _colour(rng, (0.92, 0.90, 0.86)))
    highlight = np.exp(-(((yy - cy + thickness * 0.4) / (thickness * 0.3)) ** 2))[..., None] * 0.15
    return _on_background(xx, rng, region, np.clip(body + highlight, 0, 1))


def _tube(xx, yy, rng):
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    half_width = rng.uniform(0.17, 0.19)
    region = (np.abs(xx - cx) < half_width) & (yy > 0.12) & (yy < 0.88)
    cap = yy < 0.28
    shading = (1 - ((xx - cx) / half_width) ** 2).clip(0, 1) ** 0.5
    body = np.where(cap[..., None], _colour(rng, (0.15, 0.30, 0.75)), _colour(rng, (0.90, 0.90, 0.88)))
    return _on_background(xx, rng, region, body * (0.6 + 0.4 * shading[..., None]))


_PAINTERS: dict[str, Callable] = {
    "fabric": _fabric, "wood": _wood, "tile": _tile, "grid": _grid,
    "disk": _disk, "plate": _plate, "capsule": _capsule, "tube": _tube,
}


# --- defects: each returns (new image, boolean mask); masks are clipped to the object's region ---


def _add_defect(image: np.ndarray, region: np.ndarray, kind: str, rng: np.random.Generator):
    for _ in range(20):
        centre = _point_in(region, rng)
        new_image, mask = _DEFECTS[kind](image, region, centre, rng)
        mask &= region
        if mask.sum() >= MIN_DEFECT_PIXELS:
            return np.where(mask[..., None], new_image, image), mask
    raise RuntimeError(f"could not place a {kind} defect")  # unreachable for the shipped shapes


def _point_in(region: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random (x, y) inside the region, kept away from the image border."""
    size = region.shape[0]
    inner = ndimage.binary_erosion(region, iterations=max(1, size // 16))
    ys, xs = np.nonzero(inner if inner.any() else region)
    pick = rng.integers(len(xs))
    return float(xs[pick]), float(ys[pick])


def _draw(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _polyline(centre, rng, length: float, steps: int, wiggle: float) -> list[tuple[float, float]]:
    angle = rng.uniform(0, 2 * np.pi)
    x, y = centre
    points = [(x, y)]
    for _ in range(steps):
        angle += rng.normal(0, wiggle)
        x, y = x + np.cos(angle) * length / steps, y + np.sin(angle) * length / steps
        points.append((x, y))
    return points


def _scratch(image, region, centre, rng):
    size = image.shape[0]
    points = _polyline(centre, rng, rng.uniform(0.2, 0.4) * size, 6, 0.08)
    mask = _draw(size, lambda d: d.line(points, fill=255, width=max(2, size // 64)))
    return np.full_like(image, 0.97), mask


def _hole(image, region, centre, rng):
    size = image.shape[0]
    rx, ry = rng.uniform(0.03, 0.07, 2) * size
    x, y = centre
    mask = _draw(size, lambda d: d.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255))
    rim = mask & ~ndimage.binary_erosion(mask, iterations=max(1, size // 128))
    hole = np.where(rim[..., None], 0.35, 0.02) + np.zeros_like(image)
    return hole, mask


def _blob(size: int, centre, rng, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    distance = np.hypot(xx - centre[0], yy - centre[1]) / radius
    return (1.0 - distance + 0.35 * _smooth_noise((size, size), rng, radius / 3)) > 0.0


def _stain(image, region, centre, rng):
    size = image.shape[0]
    mask = _blob(size, centre, rng, rng.uniform(0.05, 0.1) * size)
    stain = _colour(rng, (0.35, 0.18, 0.05), 0.05)
    return 0.25 * image + 0.75 * stain, mask


def _crack(image, region, centre, rng):
    size = image.shape[0]
    trunk = _polyline(centre, rng, rng.uniform(0.15, 0.3) * size, 12, 0.5)
    branch = _polyline(trunk[len(trunk) // 2], rng, 0.1 * size, 6, 0.5)
    width = max(2, size // 96)
    mask = _draw(size, lambda d: (d.line(trunk, fill=255, width=width), d.line(branch, fill=255, width=width)))
    return image * 0.1, mask


def _missing(image, region, centre, rng):
    """A chunk of the object near its edge is gone; the background shows through."""
    size = image.shape[0]
    edge = region & ~ndimage.binary_erosion(region)
    ys, xs = np.nonzero(edge)
    pick = rng.integers(len(xs))
    radius = rng.uniform(0.06, 0.1) * size
    mask = _blob(size, (xs[pick], ys[pick]), rng, radius)
    background = np.median(image[~region], axis=0)
    return np.broadcast_to(background, image.shape), mask


def _cut_paste(image, region, centre, rng):
    """A rotated, darkened patch of another part of the image pasted over this one."""
    size = image.shape[0]
    half = int(rng.uniform(0.05, 0.09) * size)
    x, y = (int(np.clip(c, half, size - half)) for c in centre)
    sx, sy = rng.integers(half, size - half, 2)
    patch = np.rot90(image[sy - half : sy + half, sx - half : sx + half], k=int(rng.integers(1, 4)))
    pasted = image.copy()
    pasted[y - half : y + half, x - half : x + half] = patch * 0.55 + 0.3 * _colour(rng, (0.5, 0.3, 0.6), 0.1)
    mask = np.zeros(region.shape, bool)
    mask[y - half : y + half, x - half : x + half] = True
    return pasted, mask


def _color(image, region, centre, rng):
    """A blotch whose hue is rotated (RGB channels cycled) and saturated."""
    size = image.shape[0]
    mask = _blob(size, centre, rng, rng.uniform(0.07, 0.12) * size)
    shifted = np.roll(image, shift=int(rng.integers(1, 3)), axis=2)
    grey = shifted.mean(axis=2, keepdims=True)
    return np.clip(grey + 2.0 * (shifted - grey) + 0.1, 0, 1), mask


_DEFECTS: dict[str, Callable] = {
    "scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack,
    "missing": _missing, "cut_paste": _cut_paste, "color": _color,
}
