"""What the Space hands back as files: each request's images in a folder of its own, the full-resolution map and
mask of a visitor's last detection, and the batch's CSV (safe to open in a spreadsheet)."""

import csv
import functools
import io
import itertools
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from zsad.detection.detector import Detection, resize_map
from zsad.runtime.images import bounded_size

BATCH_CSV_COLUMNS = ["file", "score", "verdict", "anomalous_pixel_percent", "mask", "error"]
THUMBNAIL_SIDE = 320  # gallery overlays are downscaled to this side; the masks zip keeps full size
# Longest side of the map a session keeps for its full-resolution downloads when the detection has no model-size
# map (tiles): 16 MB in float32, where an 8000x8000 map would take 256 MB.
KEPT_MAP_SIDE = 2048
# How long a request's folder stays after its handler returned: Gradio copies the files into its own cache right
# then; the margin covers a slow copy of a large batch.
FOLDER_LINGER_SECONDS = 600.0
# A spreadsheet runs a cell that starts with one of these as a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class Download:
    """An output image offered as a file under its own name (PNG, fast compression)."""

    name: str
    image: Image.Image


class OutputFolders:
    """A folder of its own for every request's output files; no request removes another's folder while it may
    still be in use: a folder goes ``FOLDER_LINGER_SECONDS`` after its request said it was done.

    Gradio stores a returned PIL image in its cache under a name derived from the image's content, rewriting that
    file in place each time; a client still downloading it for an earlier request with the same output (two visitors
    on the same example) then gets a truncated file. A returned file path is copied into the cache atomically."""

    def __init__(self, linger: float = FOLDER_LINGER_SECONDS, root: Path | None = None):
        """``root``: the folder to make the request folders in (the app's, removed on SIGTERM); by default a
        temporary folder of its own, removed when the object is collected or the interpreter exits."""
        self._own_root = None if root else tempfile.TemporaryDirectory(prefix="zsad-space-")
        self._root = Path(root) if root else Path(self._own_root.name)
        self._done: dict[Path, float] = {}
        self._lock = threading.Lock()
        self._linger = linger

    def new_folder(self) -> Path:
        self._remove_expired()
        return Path(tempfile.mkdtemp(prefix="request-", dir=self._root))

    def done(self, folder: Path) -> None:
        with self._lock:
            self._done[folder] = time.monotonic()

    def _remove_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [folder for folder, since in self._done.items() if now - since >= self._linger]
            for folder in expired:
                del self._done[folder]
        for folder in expired:
            shutil.rmtree(folder, ignore_errors=True)


def replace_images(value, folder: Path):
    """``value`` with every PIL image (in nested tuples and lists) replaced by the path of a file holding it: PNG
    for one-channel masks (exact), WebP otherwise (Gradio's own default for displayed images)."""
    numbers = itertools.count()

    def replace(item):
        if isinstance(item, Download):
            path = folder / item.name
            item.image.save(path, compress_level=1)
            return str(path)
        if isinstance(item, Image.Image):
            path = folder / f"{next(numbers)}.{'png' if item.mode == 'L' else 'webp'}"
            item.save(path)
            return str(path)
        if isinstance(item, (tuple, list)):
            return type(item)(replace(part) for part in item)
        return item

    return replace(value)


def serving_files(handler, folders: OutputFolders):
    """``handler`` (returning an object with ``as_gradio()``, or a list of downloads) for Gradio: its outputs as a
    tuple, with images as files of the request's own folder."""

    @functools.wraps(handler)  # Gradio reads the parameters (and which are optional) from the handler's signature
    def serve(*inputs):
        outputs = handler(*inputs)
        folder = folders.new_folder()
        try:
            return replace_images(outputs.as_gradio() if hasattr(outputs, "as_gradio") else outputs, folder)
        finally:
            folders.done(folder)

    return serve


def map_to_uint8(anomaly_map) -> np.ndarray:
    """A [0, 1] map as 8-bit levels 0-255 (rounded)."""
    return torch.as_tensor(anomaly_map).mul(255.0).round_().to(torch.uint8).numpy()


@dataclass(frozen=True)
class FullResolution:
    """What the full-resolution downloads of a visitor's last detection are made from, kept in the session: the
    detection's map at the model's input size (a tiled detection's map at most ``KEPT_MAP_SIDE`` on its longest side),
    the mask's own (pixel) threshold and the upload's size."""

    stem: str
    mask_threshold: float
    original_size: tuple[int, int]
    kept_map: np.ndarray

    @classmethod
    def of(cls, result: Detection, stem: str) -> "FullResolution":
        size = result.original_size or (result.anomaly_map.shape[1], result.anomaly_map.shape[0])
        kept = result.model_map
        if kept is None:
            kept = result.anomaly_map
            if max(kept.shape) > KEPT_MAP_SIDE:
                kept = resize_map(torch.from_numpy(kept), bounded_size((kept.shape[1], kept.shape[0]), KEPT_MAP_SIDE))
        return cls(stem, result.mask_threshold, size, np.ascontiguousarray(kept, dtype=np.float32))

    def full_map(self) -> np.ndarray:
        """(H, W) map at the upload's size (``Detection.full_resolution_map`` of the detection it was made from)."""
        width, height = self.original_size
        if self.kept_map.shape == (height, width):
            return self.kept_map
        return resize_map(torch.from_numpy(self.kept_map), self.original_size)

    def downloads(self) -> list[Download]:
        """The anomaly map (0-255 grey PNG) and the binary mask (map >= the mask threshold) at the upload's size."""
        full_map = self.full_map()
        mask = (full_map >= self.mask_threshold).astype(np.uint8) * 255
        return [Download(f"{self.stem}_anomaly_map.png", Image.fromarray(map_to_uint8(full_map), mode="L")),
                Download(f"{self.stem}_mask.png", Image.fromarray(mask, mode="L"))]


def full_resolution_files(last: FullResolution | None) -> list[Download]:
    """The full-resolution downloads of the visitor's last detection (made on request: ~1 s for 12 MP)."""
    if last is None:
        raise gr.Error("Run a detection first; its full-resolution map and mask are then made here.", print_exception=False)
    return last.downloads()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail(image: Image.Image, path: Path) -> str:
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    small.save(path)
    return str(path)


def spreadsheet_safe(value):
    """A text cell that a spreadsheet would run as a formula, prefixed with a single quote (OWASP); others as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_batch_csv(rows: list[list], path: Path) -> Path:
    """Scores at full precision (the table shows them rounded); text cells made safe to open in a spreadsheet."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(BATCH_CSV_COLUMNS)
        writer.writerows([spreadsheet_safe("" if value is None else value) for value in row] for row in rows)
    return path
