"""zsad Space: drop an image, type the product's name, pick a method, see where the defect is.

```bash
python app.py                                  # default CLIP (Hub or cache), every registered method
python app.py --clip /path/to/clip             # a local copy of the backbone
python app.py --checkpoint stackclip=user/repo # or ZSAD_STACKCLIP_CHECKPOINT=user/repo
python app.py --tiny                           # tiny random CLIP: UI work only, results are noise
```

Host and port follow Gradio's own ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``. The UI only calls
``zsad.inference``; the ``detect`` endpoint is public for ``gradio_client`` (``api_name="detect"``).
"""

import argparse
import base64
import csv
import functools
import hashlib
import html
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

import zsad
import zsad.images
from zsad.allocator import return_large_buffers_to_the_system
from zsad.errors import BackboneLoadError, ZSADError
from zsad.inference import DEFAULT_THRESHOLD, AnomalyDetector, Detection, check_threshold, resize_map
from zsad.loading import PRECISIONS, add_device_argument, resolve_device, resolve_precision
from zsad.modeling.class_name_filter import ClassNameChoice
from zsad.modeling.configuration_zsad_base import DEFAULT_CLIP
from zsad.modeling.lru_cache import LRUCache
from zsad.modeling.modeling_genclip import GenCLIPImageDetails
from zsad.modeling.prompting import clean_class_name, prompt_ensemble_features
from zsad.profile import ProductProfile

COMPARE = "compare"
# Selector order and labels; methods registered later without an entry here are shown under their own name.
DISPLAY_NAMES = {"stackclip": "StackCLIP", "genclip": "GenCLIP", "baseline": "CLIP baseline"}
# One request at a time uses both cores of a CPU Space; a bounded queue tells the rest it is full.
QUEUE_SIZE = 16
CONCURRENCY_LIMIT = 1
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
TABLE_HEADERS = ["method", "status", "score", "verdict", "anomalous pixels (%)", "seconds", "details"]
# Reference images per request: each adds its patch features at every tapped layer to the memory (about 11 MB at
# 518 px in bfloat16, 22 MB in float32) and to the nearest-neighbour search.
MAX_REFERENCES = 16
# Profiles kept for the sets of references seen last (16 references at 518 px in bfloat16: 180 MB per set, shared by
# the methods).
PROFILE_CACHE_SIZE = 2
TABLE_TYPES = ["str", "str", "number", "str", "number", "number", "str"]  # plain text: user text never renders as HTML
# Longest side of the images the page shows: the model sees 518 px anyway, and a camera's 12 MP would cost seconds
# in overlays and image encoding; the full-resolution map and mask are offered as files. At 1000, a 4000x3000 JPEG
# decodes at 1/4 scale straight to this size (benchmarks/bench_camera.py).
DISPLAY_SIDE = 1000


# ----- configuration --------------------------------------------------------------------------------


def checkpoint_variable(method: str) -> str:
    """The environment variable naming a method's checkpoint, e.g. ZSAD_STACKCLIP_CHECKPOINT."""
    return f"ZSAD_{method.upper()}_CHECKPOINT"


def build_parser() -> argparse.ArgumentParser:
    variables = ", ".join(checkpoint_variable(method) for method in zsad.METHODS)
    parser = argparse.ArgumentParser(
        description="zsad Space: zero-shot anomaly detection in the browser. Host and port follow "
        "GRADIO_SERVER_NAME / GRADIO_SERVER_PORT."
    )
    parser.add_argument("--clip", help=f"Hub id or local path of the CLIP backbone (env ZSAD_CLIP; default {DEFAULT_CLIP})")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="METHOD=PATH",
        help=f"trained checkpoint (Hub id or folder) for a method; repeatable (env {variables}). "
        "Methods without one run untrained.",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=os.environ.get("ZSAD_PRECISION", "auto"),
        help="vision backbone precision (env ZSAD_PRECISION); auto = bfloat16 where the device runs it natively, "
        "float16 on GPUs without bfloat16, int8 vision linears on other CPUs",
    )
    add_device_argument(parser)
    parser.add_argument("--tiny", action="store_true", help="use a tiny random CLIP (no download; for UI work only)")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="requests waiting before 'queue full'")
    parser.add_argument("--batch-max-images", type=int, default=BatchCaps.max_images, help="most images in one batch (Batch tab)")
    parser.add_argument("--batch-max-megabytes", type=float, default=BatchCaps.max_megabytes,
                        help="most megabytes of images in one batch, zips counted uncompressed")
    return parser


def configured_checkpoints(flags: list[str], environ=os.environ) -> dict[str, str]:
    """Checkpoints from ZSAD_<METHOD>_CHECKPOINT variables, overridden by --checkpoint METHOD=PATH flags."""
    checkpoints = {method: environ[checkpoint_variable(method)] for method in zsad.METHODS if environ.get(checkpoint_variable(method))}
    for flag in flags:
        method, separator, path = flag.partition("=")
        if not separator or not path:
            raise ZSADError(f"--checkpoint takes METHOD=PATH, got '{flag}'; methods: {', '.join(zsad.METHODS)}.")
        checkpoints[method.strip().lower()] = path
    return checkpoints


def load_detector(clip: str | None, checkpoints: dict[str, str], precision: str = "auto", device: str = "auto") -> AnomalyDetector:
    """The backbone once, then every registered method on it; exits with a hint if the backbone is missing."""
    device = resolve_device(device)
    try:
        return AnomalyDetector.load(
            methods=ordered_methods(zsad.METHODS), checkpoints=checkpoints, clip=clip,
            dtype=resolve_precision(precision, device), device=device,
        )
    except BackboneLoadError as error:
        sys.exit(
            f"zsad app: could not load the CLIP backbone '{error.clip}' (offline, or not in the Hugging Face cache?).\n"
            "Point the app at a local copy with --clip PATH (or ZSAD_CLIP=PATH), "
            "or start it with --tiny (a tiny random CLIP) for UI work."
        )


def ordered_methods(methods) -> list[str]:
    known = [method for method in DISPLAY_NAMES if method in methods]
    return known + [method for method in methods if method not in DISPLAY_NAMES]


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


# ----- the request handler --------------------------------------------------------------------------


def image_source(payload):
    """What Gradio hands an unprocessed image input (a file payload, or a data URL from some sources) ->
    something ``zsad.images.load_image`` reads, so that its messages reach the user for every bad file."""
    if isinstance(payload, dict):
        if payload.get("path"):
            return payload["path"]
        url = payload.get("url") or ""
        if url.startswith("data:") and "," in url:
            return base64.b64decode(url.partition(",")[2])
        return None
    return payload


class ReferenceProfiles:
    """Product profiles built from uploaded reference images, once per set of references: keyed on the files'
    contents, the method (or compare) and the class name, the last ``PROFILE_CACHE_SIZE`` kept."""

    def __init__(self, detector: AnomalyDetector, size: int = PROFILE_CACHE_SIZE):
        self.detector = detector
        self._cache = LRUCache(size)
        self.builds = 0

    def get(self, payloads, class_name: str, method: str) -> dict[str, ProductProfile]:
        """{method: profile} for the uploaded references (every method in compare mode); {} without references."""
        sources = [image_source(payload) for payload in payloads or []]
        if not sources:
            return {}
        if len(sources) > MAX_REFERENCES:
            raise ZSADError(f"{len(sources)} reference images were given; at most {MAX_REFERENCES} are used (each adds to memory "
                            f"and time). Pick up to {MAX_REFERENCES} typical good parts.")
        contents = [reference_bytes(source) for source in sources]
        key = (tuple(hashlib.sha256(data).hexdigest() for data in contents), method, clean_class_name(class_name))
        return self._cache.get(key, lambda: self._build(contents, class_name, method))

    def _build(self, contents: list[bytes], class_name: str, method: str) -> dict[str, ProductProfile]:
        pictures = []
        for number, data in enumerate(contents, start=1):
            try:
                pictures.append(zsad.images.load_image(data))
            except ZSADError as error:
                raise ZSADError(f"Reference image {number}: {error}") from error
        methods = self.detector.method_names if method == COMPARE else [method]
        self.builds += 1
        return self.detector.build_profiles(methods, class_name, pictures)


def reference_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except (OSError, TypeError) as error:
        raise ZSADError(f"A reference image could not be read ({error}); upload it again.") from error


def image_name(payload) -> str | None:
    """How errors call an upload: the user's own file name (not the server's copy of it)."""
    if isinstance(payload, dict):
        return payload.get("orig_name") or ("the pasted image" if not payload.get("path") else None)
    return None


@dataclass
class Download:
    """An output image offered as a file under its own name (PNG, fast compression)."""

    name: str
    image: Image.Image


@dataclass
class FullResolution:
    """What the full-resolution downloads of the last detection are made from, kept in the visitor's session: the
    map at the model's input size and the upload's size (a tiled detection keeps its full map in 8 bits, and
    its mask)."""

    stem: str
    threshold: float
    original_size: tuple[int, int]
    model_map: np.ndarray | None = None
    levels: np.ndarray | None = None
    mask: np.ndarray | None = None

    @classmethod
    def of(cls, result: Detection, stem: str) -> "FullResolution":
        if result.model_map is not None:
            return cls(stem, result.threshold, result.original_size, model_map=result.model_map)
        return cls(stem, result.threshold, result.original_size, levels=map_to_uint8(result.anomaly_map), mask=result.mask)

    def downloads(self) -> list[Download]:
        """The anomaly map (0-255 grey PNG) and the binary mask at the upload's full resolution."""
        levels, mask = self.levels, self.mask
        if self.model_map is not None:
            full_map = resize_map(torch.from_numpy(self.model_map), self.original_size)
            levels, mask = map_to_uint8(full_map), full_map >= self.threshold
        return [Download(f"{self.stem}_anomaly_map.png", Image.fromarray(levels, mode="L")),
                Download(f"{self.stem}_mask.png", Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))]


def full_resolution_files(last: FullResolution | None) -> list[Download]:
    """The full-resolution downloads of the visitor's last detection (made on request: ~1 s for 12 MP)."""
    if last is None:
        raise gr.Error("Run a detection first; its full-resolution map and mask are then made here.", print_exception=False)
    return last.downloads()


def make_handler(detector: AnomalyDetector, profiles: ReferenceProfiles | None = None, display_side: int = DISPLAY_SIDE):
    """``detect(image, class_name, method, threshold, references, slider, tiles)`` -> (before/after pair, mask, score,
    report, table, gallery, slider, downloads (cleared), the session's ``FullResolution``); the gallery (every method's
    overlay and mask) is filled in compare mode only.

    With reference images, their profile (built once per set) adds the reference map and calibrated thresholds.
    ``slider`` is ``{"value": what the app last put on the threshold slider, "move": whether to put it there now}``:
    while the slider still shows that value the calibrated thresholds apply (and the slider moves to the calibrated
    value), once the user moves it the slider's own value does.
    The page shows images at most ``display_side`` pixels on their longest side (large JPEGs are decoded at reduced
    size); the first method's map and mask at the upload's full resolution are made from the session's
    ``FullResolution`` when asked for (``full_resolution_files``). ``tiles`` scores the
    full-resolution image in overlapping windows of the model's input size (one method at a time, without references).
    Every error a user can cause comes back as ``gr.Error`` with zsad's message; the app keeps serving.
    """
    profiles = profiles or ReferenceProfiles(detector)

    def detect(image, class_name, method, threshold, references=None, slider=None, tiles=False, progress=gr.Progress()):
        slider_set = (slider or {}).get("value", DEFAULT_THRESHOLD)
        try:
            by_method = profiles.get(references, class_name, method)
            chosen = None if by_method and abs(threshold - slider_set) < 0.005 else threshold
            results, picture = run_detection(image, class_name, method, chosen, by_method, tiles, progress)
        except ZSADError as error:
            raise gr.Error(str(error), print_exception=False) from error
        first = results[0]
        calibration = by_method[first.method].calibration if by_method else None
        return (
            (picture, zsad.images.bounded(first.overlay, display_side)),
            zsad.images.bounded(first.mask_image(), display_side),
            round(first.score, 4),
            report(results, by_method),
            [table_row(result) for result in results],
            gallery(results) if method == COMPARE else [],
            {"value": round(calibration.image_threshold, 2), "move": True} if calibration and chosen is None
            else {"value": slider_set, "move": False},
            None,  # the last request's downloads no longer apply
            FullResolution.of(first, Path(image_name(image) or "image").stem),
        )

    def run_detection(image, class_name, method, threshold, by_method, tiles, progress) -> tuple[list[Detection], Image.Image]:
        if not tiles:
            loaded = zsad.images.read_image(image_source(image), name=image_name(image), max_side=display_side)
            if method == COMPARE:
                results = detector.compare(loaded, class_name, threshold=threshold, profiles=by_method, display_side=display_side)
                return list(results.values()), loaded.image
            result = detector.detect(loaded, class_name, method=method, threshold=threshold, profile=by_method.get(method),
                                     display_side=display_side)
            return [result], loaded.image
        if method == COMPARE:
            raise ZSADError("Tiles run one method at a time: pick a method instead of 'compare all'.")
        if by_method:
            raise ZSADError("Tiles do not use reference images yet: clear the references or the tiles option.")
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        loaded = zsad.images.read_image(image_source(image), name=image_name(image))
        result = detector.detect_tiled(loaded, class_name, method=method, threshold=threshold,
                                       progress=lambda done, total: progress(done / total, desc=f"{done} of {total} tiles"))
        return [result], zsad.images.bounded(loaded.image, display_side)

    return detect


def map_to_uint8(anomaly_map) -> np.ndarray:
    """A [0, 1] map as 8-bit levels 0-255 (rounded)."""
    return torch.as_tensor(anomaly_map).mul(255.0).round_().to(torch.uint8).numpy()


class ImageFiles:
    """Hands Gradio every output image as a file of its own request's folder.

    Gradio stores a returned PIL image in its cache under a name derived from the image's content, rewriting that
    file in place each time; a client still downloading it for an earlier request with the same output (two
    visitors on the same example) then gets a truncated file ("peer closed connection"). A returned file path is
    copied into the cache atomically and never rewritten. The folders of the last ``keep`` requests are kept
    (the Space passes its concurrency limit + 1): Gradio has copied their files before later requests run."""

    def __init__(self, keep: int = 2):
        self._root = tempfile.TemporaryDirectory(prefix="zsad-space-")
        self._folders: deque[Path] = deque()
        self._keep = keep

    def new_folder(self) -> Path:
        self._folders.append(Path(tempfile.mkdtemp(prefix="request-", dir=self._root.name)))
        while len(self._folders) > self._keep:
            shutil.rmtree(self._folders.popleft())
        return self._folders[-1]

    def replace_images(self, value, folder: Path):
        """``value`` with every PIL image (in nested tuples and lists) replaced by the path of a file holding it:
        PNG for one-channel masks (exact), WebP otherwise (Gradio's own default for displayed images)."""
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


def serving_files(handler, files: ImageFiles):
    """``handler`` for Gradio: the same outputs, with images as files (see ``ImageFiles``)."""

    @functools.wraps(handler)  # Gradio reads the parameters (and which are optional) from the handler's signature
    def detect(*inputs):
        return files.replace_images(handler(*inputs), files.new_folder())

    return detect


def escaped(text: str) -> str:
    """User text shown in Markdown as typed: no HTML (``<img src=x>`` stays text), no Markdown formatting."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", html.escape(text, quote=False))


def report(results: list[Detection], profiles: dict[str, ProductProfile] | None = None) -> str:
    """Markdown: the verdict of each method, its status, thresholds and where they come from, details and time."""
    lines = []
    for result in results:
        lines.append(
            f"### {display_name(result.method)} ({result.status}): **{result.verdict}**, "
            f"score {result.score:.3f} (threshold {result.threshold:.2f})"
        )
        lines.append(f"- {reference_line(result, (profiles or {}).get(result.method))}")
        if result.note:
            lines.append(f"- ⚠️ {escaped(result.note)}")
        if result.tiles:
            lines.append(f"- scored at full resolution in {result.tiles} tiles (score: the highest tile's)")
        if isinstance(result.details, GenCLIPImageDetails):
            lines.append(f"- {class_name_filter_decision(result.details.class_name)}")
        lines.extend(f"- {key}: {escaped(json.dumps(value))}" for key, value in result.details_dict().items())
    total = sum(result.seconds for result in results)
    lines.append(f"\nClass name used: “{escaped(results[0].class_name)}” · request took {total:.2f} s")
    return "\n".join(lines)


def reference_line(result: Detection, profile: ProductProfile | None) -> str:
    """Where the verdict's thresholds come from, e.g. "4 reference images of good parts; calibrated on 4 good images:
    image threshold 0.63, pixel threshold 0.66"."""
    if profile is None:
        return f"No reference images (zero-shot); {result.calibration}"
    line = f"{profile.num_references} reference image{'s' if profile.num_references != 1 else ''} of good parts; {result.calibration}"
    if profile.calibration is None:
        return line + " (calibration needs at least two reference images)"
    calibration = profile.calibration
    return (f"{line}: image threshold {calibration.image_threshold:.3f}, pixel threshold {calibration.pixel_threshold:.3f} "
            f"(leave-one-out false-alarm rate {calibration.false_alarm_rate():.0%})")


def class_name_filter_decision(choice: ClassNameChoice) -> str:
    """GenCLIP's class name filtering (CNF) decision for one image as a sentence."""
    evidence = f" (CLIP probability {choice.probability:.2f})" if choice.probability is not None else ""
    given, used = escaped(choice.name_given), escaped(choice.name_used)
    if choice.kept:
        return f"Class name filter ({choice.mode}): kept “{given}”{evidence}"
    return f"Class name filter ({choice.mode}): “{given}” does not fit the image{evidence}; used “{used}”"


def table_row(result: Detection) -> list:
    return [
        display_name(result.method),
        result.status,
        round(result.score, 4),
        result.verdict,
        round(100.0 * float(result.mask.mean()), 2),
        round(result.seconds, 3),
        json.dumps(result.details_dict()) if result.details is not None else "",
    ]


def gallery(results: list[Detection]) -> list:
    items = []
    for result in results:
        name = display_name(result.method)
        items.append((result.overlay, f"{name}: {result.score:.3f} {result.verdict}"))
        items.append((result.mask_image(), f"{name}: mask at {result.mask_threshold:.2f}"))
    return items


# ----- batches --------------------------------------------------------------------------------------
# The batch tab: many images (or zips of them) of one product, one method; a sortable table, overlays, a CSV and a
# zip of masks. Batches have their own Gradio worker (concurrency group), so a single-image request is not queued
# behind a whole batch; the model still runs one computation at a time (``ComputeTurns``), in chunks of BATCH_CHUNK
# images for a batch, and a waiting single request goes before the batch's next chunk. Progress is reported per chunk.

# Images per forward pass. One: a chunk of 4 raised a batch's peak memory to +175 MB above the loaded bf16 detector,
# against +43 MB for chunks of 1 (benchmarks/bench_batch.py), and the Space's bf16 memory target has no margin left.
BATCH_CHUNK = 1
BATCH_CONCURRENCY_ID = "batch"
BATCH_CONCURRENCY_LIMIT = 1
BATCH_TABLE_HEADERS = ["file", "score", "verdict", "anomalous pixels (%)"]
BATCH_CSV_COLUMNS = ["file", "score", "verdict", "anomalous_pixel_percent", "error"]
THUMBNAIL_SIDE = 320  # gallery overlays are downscaled to this side; the masks zip keeps full size


class ComputeTurns:
    """One model computation at a time, single requests first.

    The backbone's activations must fit the Space's memory target once, and its hidden-state hooks belong to one
    forward pass at a time. A single request waits for the running computation only (one batch chunk at most); a
    batch's next chunk waits while a single request waits or runs.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._busy = False
        self._singles_waiting = 0

    @contextmanager
    def single(self):
        with self._condition:
            self._singles_waiting += 1
            self._condition.wait_for(lambda: not self._busy)
            self._singles_waiting -= 1
            self._busy = True
        yield from self._release_after()

    @contextmanager
    def batch_chunk(self):
        with self._condition:
            self._condition.wait_for(lambda: not self._busy and self._singles_waiting == 0)
            self._busy = True
        yield from self._release_after()

    def _release_after(self):
        try:
            yield
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()


def taking_turns(handler, turns: ComputeTurns):
    """``handler`` (a single-image request) run in its turn."""

    @functools.wraps(handler)  # Gradio reads the parameters (optional ones, the progress tracker) from the signature
    def detect(*inputs):
        with turns.single():
            return handler(*inputs)

    return detect


@dataclass(frozen=True)
class BatchCaps:
    """Most images, and most megabytes of image files (zips counted uncompressed), in one batch; checked before
    anything is decoded."""

    max_images: int = 100
    max_megabytes: float = 200.0


@dataclass
class BatchImage:
    """One image of a batch: its display name and something ``zsad.images.load_image`` reads (a path, or a zip
    entry's bytes read on demand)."""

    name: str
    read: Callable[[], str | bytes]


def batch_images(paths: list[str], caps: BatchCaps) -> list[BatchImage]:
    """The uploaded image files and the images inside uploaded zips, within the count and size caps."""
    images, total_bytes = [], 0
    for path in map(Path, paths):
        if path.suffix.lower() == ".zip":
            entries, entry_bytes = zip_images(path)
            images += entries
            total_bytes += entry_bytes
        else:
            images.append(BatchImage(path.name, partial(str, path)))
            total_bytes += path.stat().st_size
    check_batch_caps(len(images), total_bytes, caps)
    return with_unique_names(images)


def zip_images(path: Path) -> tuple[list[BatchImage], int]:
    """The image entries of a zip (by suffix; folders and other files are skipped) and their uncompressed size."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [info for info in archive.infolist() if not info.is_dir() and is_image_entry(info.filename)]
    except zipfile.BadZipFile as error:
        raise ZSADError(f"{path.name} is not a readable zip archive ({error}).") from error
    return [BatchImage(info.filename, partial(read_zip_entry, path, info.filename)) for info in entries], sum(
        info.file_size for info in entries
    )


def is_image_entry(name: str) -> bool:
    """Image files of a zip, without macOS's resource-fork copies (``__MACOSX/``, ``._name``)."""
    return Path(name).suffix.lower() in zsad.images.IMAGE_SUFFIXES and "__MACOSX" not in name and not Path(name).name.startswith("._")


def read_zip_entry(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


def check_batch_caps(count: int, total_bytes: int, caps: BatchCaps) -> None:
    advice = "Split it into smaller batches, or run `zsad predict` on a folder (no limit)."
    if count == 0:
        raise ZSADError("The batch holds no images: drop image files (PNG, JPEG, BMP, TIFF, WebP) or a zip of them.")
    if count > caps.max_images:
        raise ZSADError(f"The batch holds {count} images; the Space takes at most {caps.max_images} at a time. {advice}")
    if total_bytes > caps.max_megabytes * 2**20:
        raise ZSADError(
            f"The batch holds {total_bytes / 2**20:.1f} MB of images (zips counted uncompressed); the Space takes at most "
            f"{caps.max_megabytes:g} MB at a time. {advice}"
        )


def with_unique_names(images: list[BatchImage]) -> list[BatchImage]:
    """Repeated names (the same file name in two uploads or zips) get " (2)", " (3)", ... before their suffix."""
    seen: dict[str, int] = {}
    for image in images:
        seen[image.name] = seen.get(image.name, 0) + 1
        if seen[image.name] > 1:
            stem, suffix = os.path.splitext(image.name)
            image.name = f"{stem} ({seen[image.name]}){suffix}"
    return images


def detect_chunk(detector: AnomalyDetector, chunk: list[BatchImage], class_name: str, method: str,
                 threshold: float) -> list[Detection | ZSADError]:
    """One forward pass over the chunk's readable images; an unreadable one gets its error instead of a result."""
    outcomes: list[Detection | ZSADError] = []
    for image in chunk:
        try:
            outcomes.append(zsad.images.load_image(image.read()))
        except ZSADError as error:
            outcomes.append(error)
    pictures = [outcome for outcome in outcomes if not isinstance(outcome, ZSADError)]
    detections = iter(detector.detect_batch(pictures, class_name, method=method, threshold=threshold) if pictures else [])
    return [outcome if isinstance(outcome, ZSADError) else next(detections) for outcome in outcomes]


def anomalous_percent(result: Detection) -> float:
    return round(100.0 * float(result.mask.mean()), 2)


def make_batch_handler(detector: AnomalyDetector, files: ImageFiles, caps: BatchCaps = BatchCaps(), turns: ComputeTurns | None = None):
    """``detect_batch(files, class_name, method, threshold)`` -> (table rows, gallery, CSV path, masks zip path,
    summary). ``files`` are uploaded image files and zips of images; errors that concern the whole batch (caps,
    class name, method, threshold) come back as ``gr.Error``, an unreadable image as its row's error."""
    turns = turns or ComputeTurns()

    def detect_batch(uploads, class_name, method, threshold, progress=gr.Progress()):
        started = time.perf_counter()
        try:
            images = batch_images(list(uploads or []), caps)
            class_name = clean_class_name(class_name)
            check_threshold(threshold)
            status = detector.status(method)
        except ZSADError as error:
            raise gr.Error(str(error), print_exception=False) from error
        folder = files.new_folder()
        rows, views = [], []
        with zipfile.ZipFile(folder / "masks.zip", "w", compression=zipfile.ZIP_STORED) as masks:
            for start in range(0, len(images), BATCH_CHUNK):
                progress((start, len(images)), desc=f"{start} of {len(images)} images done", unit="images")
                chunk = images[start:start + BATCH_CHUNK]
                with turns.batch_chunk():
                    outcomes = detect_chunk(detector, chunk, class_name, method, threshold)
                for image, outcome in zip(chunk, outcomes):
                    rows.append(batch_row(image.name, outcome))
                    if isinstance(outcome, Detection):
                        masks.writestr(f"{os.path.splitext(image.name)[0]}_mask.png", png_bytes(outcome.mask_image()))
                        views.append((thumbnail(outcome.overlay, folder / f"{len(rows)}.webp"),
                                      f"{image.name}: {outcome.score:.3f} {outcome.verdict}"))
        table_path = write_batch_csv(rows, folder / "scores.csv")
        summary = batch_summary(rows, method, status, threshold, time.perf_counter() - started)
        table = [[name, None if score is None else round(score, 4), verdict, percent] for name, score, verdict, percent, _ in rows]
        return table, views, str(table_path), str(folder / "masks.zip"), summary

    return detect_batch


def batch_row(name: str, outcome: Detection | ZSADError) -> list:
    """[file, score, verdict, anomalous pixel %, error] (score and % left empty for an unreadable image)."""
    if isinstance(outcome, ZSADError):
        return [name, None, "unreadable", None, str(outcome)]
    return [name, outcome.score, outcome.verdict, anomalous_percent(outcome), ""]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail(image: Image.Image, path: Path) -> str:
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    small.save(path)
    return str(path)


def write_batch_csv(rows: list[list], path: Path) -> Path:
    """Scores at full precision (the table shows them rounded)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(BATCH_CSV_COLUMNS)
        writer.writerows(["" if value is None else value for value in row] for row in rows)
    return path


def batch_summary(rows: list[list], method: str, status: str, threshold: float, seconds: float) -> str:
    scored = [row for row in rows if row[1] is not None]
    anomalous = sum(row[2] == "anomalous" for row in scored)
    lines = [
        f"### {anomalous} of {len(scored)} images anomalous at threshold {threshold:.2f}",
        f"{display_name(method)} ({status}) · {len(rows)} files in {seconds:.1f} s",
    ]
    lines += [f"- {escaped(row[0])}: {escaped(row[4])}" for row in rows if row[1] is None]
    return "\n".join(lines)


def batch_tab(detector: AnomalyDetector, caps: BatchCaps, turns: ComputeTurns) -> None:
    """The batch tab's inputs, outputs and event (inside an open ``gr.Tab``)."""
    choices = [(f"{display_name(name)} ({detector.status(name)})", name) for name in detector.method_names]
    with gr.Row():
        with gr.Column():
            uploads = gr.File(label=f"Images or a zip of images (up to {caps.max_images} images, {caps.max_megabytes:g} MB)",
                              file_count="multiple", file_types=["image", ".zip"], type="filepath", elem_id="batch-files")
            class_name = gr.Textbox(label="Product name", placeholder="e.g. bottle, metal nut, pcb", elem_id="batch-class-name")
            method = gr.Radio(choices=choices, value=choices[0][1], label="Method", elem_id="batch-method")
            threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Threshold (mask and verdict)")
            run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
        with gr.Column():
            summary = gr.Markdown(elem_id="batch-summary")
            csv_file = gr.File(label="Scores (CSV)", elem_id="batch-csv")
            masks_zip = gr.File(label="Masks (zip of PNGs)", elem_id="batch-masks")
    table = gr.Dataframe(headers=BATCH_TABLE_HEADERS, datatype=["str", "number", "str", "number"], label="Results (click a header to sort)",
                         interactive=False, elem_id="batch-table")
    views = gr.Gallery(label="Overlays", columns=5, height=420, object_fit="contain", elem_id="batch-gallery")
    run.click(
        make_batch_handler(detector, ImageFiles(keep=BATCH_CONCURRENCY_LIMIT + 1), caps, turns),
        inputs=[uploads, class_name, method, threshold],
        outputs=[table, views, csv_file, masks_zip, summary],
        api_name="detect_batch",
        concurrency_id=BATCH_CONCURRENCY_ID,
        concurrency_limit=BATCH_CONCURRENCY_LIMIT,
    )


# ----- the page -------------------------------------------------------------------------------------


def example_rows() -> list[list]:
    """[image path, class name] rows from examples/examples.json (written by examples/make_examples.py)."""
    manifest = EXAMPLES_DIR / "examples.json"
    if not manifest.is_file():
        return []
    return [[str(EXAMPLES_DIR / row["image"]), row["class_name"]] for row in json.loads(manifest.read_text())]


def warm_example_names(detector: AnomalyDetector, names: list[str], turns: ComputeTurns) -> threading.Thread:
    """Encode the example names' prompt ensembles (baseline, StackCLIP) in the background, so a first click on an
    example does not wait for them; one name per turn, at a batch chunk's priority, so a request waits for one name at
    most."""

    def warm():
        for name in dict.fromkeys(names):
            with turns.batch_chunk():
                prompt_ensemble_features(detector.backbone, [clean_class_name(name)])

    thread = threading.Thread(target=warm, name="zsad-warm-examples", daemon=True)
    thread.start()
    return thread


def method_choices(detector: AnomalyDetector) -> list[tuple[str, str]]:
    choices = [(f"{display_name(name)} ({detector.status(name)})", name) for name in detector.method_names]
    return choices + [("compare all", COMPARE)] if len(choices) > 1 else choices


def banner(detector: AnomalyDetector, tiny: bool) -> str:
    notes = []
    if tiny:
        notes.append(
            "⚠️ **Tiny random CLIP** (`--tiny`): scores and maps are noise. This mode is for UI work only; "
            "start without `--tiny` (or with `--clip PATH`) for real results."
        )
    untrained = [name for name in detector.method_names if detector.status(name) == "untrained"]
    if untrained:
        variables = " / ".join(f"`{checkpoint_variable(name)}`" for name in untrained)
        notes.append(
            f"ℹ️ **{', '.join(map(display_name, untrained))}: untrained** (no checkpoint configured; training-free "
            f"start from CLIP). Set {variables} or `--checkpoint METHOD=PATH` to use trained weights."
        )
    return "\n\n".join(notes)


def runtime(detector: AnomalyDetector) -> str:
    """Where the models run, e.g. "Runs on CPU · vision tower in bfloat16, text in bfloat16"."""
    device = detector.device
    where = f"GPU {device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type.upper()
    vision, text = (str(dtype).removeprefix("torch.") for dtype in (detector.backbone.dtype, detector.backbone.text_dtype))
    return f"Runs on {where} · vision tower in {vision}, text in {text}"


def build_demo(detector: AnomalyDetector, tiny: bool = False, batch_caps: BatchCaps = BatchCaps(),
               turns: ComputeTurns | None = None) -> gr.Blocks:
    """The Blocks page around ``detector`` (not launched)."""
    choices = method_choices(detector)
    turns = turns or ComputeTurns()
    with gr.Blocks(title="zsad: zero-shot anomaly detection") as demo:
        gr.Markdown(
            "# zsad: zero-shot anomaly detection\n"
            "Drop an image of a product, type what the product is, pick a method and see where the defect is. "
            "The Batch tab takes many images (or a zip) at once."
        )
        notice = banner(detector, tiny)
        if notice:
            gr.Markdown(notice, elem_id="banner")
        with gr.Tab("One image", id="single"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", sources=["upload", "webcam", "clipboard"], type="filepath", elem_id="input-image")
                    class_name = gr.Textbox(label="Product name", placeholder="e.g. bottle, metal nut, pcb", elem_id="class-name")
                    method = gr.Radio(choices=choices, value=choices[0][1], label="Method", elem_id="method")
                    threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Threshold (mask and verdict)",
                                          elem_id="threshold")
                    references = gr.File(label=f"Reference images of good parts (optional, up to {MAX_REFERENCES}): calibrated "
                                         "thresholds and a reference map", file_count="multiple", type="filepath", elem_id="references")
                    tiles = gr.Checkbox(False, label="Tiles: score the full-resolution image in overlapping model-size windows "
                                        "(small defects on large images; slower, one method at a time)", elem_id="tiles")
                    run = gr.Button("Detect", variant="primary", elem_id="run")
                with gr.Column():
                    overlay = gr.ImageSlider(label="Heat map (drag: original / overlay)", type="pil", elem_id="overlay")
                    mask = gr.Image(label="Mask", type="pil", format="png", elem_id="mask")
                    score = gr.Number(label="Anomaly score", precision=4, elem_id="score")
                    verdict = gr.Markdown(elem_id="report")
                    full_resolution = gr.Button("Full-resolution map and mask (files)", elem_id="full-resolution")
                    downloads = gr.File(label="Full-resolution anomaly map (0-255) and mask", file_count="multiple", elem_id="downloads")
                    last = gr.State(None)
            table = gr.Dataframe(headers=TABLE_HEADERS, datatype=TABLE_TYPES, label="Per method", interactive=False)
            views = gr.Gallery(label="Compare: every method's overlay and mask", columns=4, height=320, object_fit="contain")
            rows = example_rows()
            if rows:
                gr.Examples(rows, inputs=[image, class_name], label="Synthetic examples")
            # The threshold the app last put on the slider: while the slider shows it, calibrated thresholds apply.
            slider = gr.State({"value": DEFAULT_THRESHOLD, "move": False})
            # preprocess=False: the raw upload goes to zsad's own image loader (clear messages for bad files).
            files = ImageFiles(keep=CONCURRENCY_LIMIT + 1)
            run.click(
                serving_files(taking_turns(make_handler(detector), turns), files),
                inputs=[image, class_name, method, threshold, references, slider, tiles],
                outputs=[overlay, mask, score, verdict, table, views, slider, downloads, last],
                api_name="detect",
                preprocess=False,
            ).then(slider_at_calibrated_value, inputs=[slider, threshold], outputs=threshold, api_name=False)
            full_resolution.click(serving_files(full_resolution_files, files), inputs=[last], outputs=[downloads],
                                  api_name="full_resolution")
        with gr.Tab("Batch", id="batch"):
            batch_tab(detector, batch_caps, turns)
        gr.Markdown(runtime(detector), elem_id="runtime")
    return demo


def slider_at_calibrated_value(slider: dict, current: float) -> float:
    """The slider moves to the calibrated threshold after a calibrated result; otherwise it stays where it is."""
    return slider["value"] if slider and slider.get("move") else current


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    return_large_buffers_to_the_system()  # before loading: the weights' conversion buffers go back too
    clip = args.clip or os.environ.get("ZSAD_CLIP")
    if args.tiny:
        from zsad.tiny_clip import save_tiny_clip

        clip = str(save_tiny_clip(tempfile.mkdtemp(prefix="zsad-tiny-clip-")))
    try:
        detector = load_detector(clip, configured_checkpoints(args.checkpoint), args.precision, args.device)
    except ZSADError as error:
        sys.exit(f"zsad app: {error}")
    turns = ComputeTurns()
    warm_example_names(detector, [name for _, name in example_rows()], turns)
    demo = build_demo(detector, tiny=args.tiny, batch_caps=BatchCaps(args.batch_max_images, args.batch_max_megabytes), turns=turns)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=CONCURRENCY_LIMIT).launch()


if __name__ == "__main__":
    main()
