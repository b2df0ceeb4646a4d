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
import functools
import html
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

import zsad
from zsad.allocator import return_large_buffers_to_the_system
from zsad.errors import BackboneLoadError, ZSADError
from zsad.inference import DEFAULT_THRESHOLD, AnomalyDetector, Detection, resize_map
from zsad.loading import PRECISIONS, add_device_argument, resolve_device, resolve_precision
from zsad.modeling.class_name_filter import ClassNameChoice
from zsad.modeling.configuration_zsad_base import DEFAULT_CLIP
from zsad.modeling.modeling_genclip import GenCLIPImageDetails

COMPARE = "compare"
# Selector order and labels; methods registered later without an entry here are shown under their own name.
DISPLAY_NAMES = {"stackclip": "StackCLIP", "genclip": "GenCLIP", "baseline": "CLIP baseline"}
# One request at a time uses both cores of a CPU Space; a bounded queue tells the rest it is full.
QUEUE_SIZE = 16
CONCURRENCY_LIMIT = 1
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
TABLE_HEADERS = ["method", "status", "score", "verdict", "anomalous pixels (%)", "seconds", "details"]
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
        "float16 on GPUs without bfloat16, else float32",
    )
    add_device_argument(parser)
    parser.add_argument("--tiny", action="store_true", help="use a tiny random CLIP (no download; for UI work only)")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="requests waiting before 'queue full'")
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


def image_name(payload) -> str | None:
    """How errors call an upload: the user's own file name (not the server's copy of it)."""
    if isinstance(payload, dict):
        return payload.get("orig_name") or ("the pasted image" if not payload.get("path") else None)
    return None


def escaped(text: str) -> str:
    """User text shown in Markdown as typed: no HTML (``<img src=x>`` stays text), no Markdown formatting."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", html.escape(text, quote=False))


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


def make_handler(detector: AnomalyDetector, display_side: int = DISPLAY_SIDE):
    """``detect(image, class_name, method, threshold, tiles)`` -> (before/after pair, mask, score, report, table,
    gallery, downloads (cleared), the session's ``FullResolution``); the gallery (every method's overlay and mask) is
    filled in compare mode only.

    The page shows images at most ``display_side`` pixels on their longest side (large JPEGs are decoded at reduced
    size); the first method's map and mask at the upload's full resolution are made from the session's
    ``FullResolution`` when asked for (``full_resolution_files``). ``tiles`` scores the
    full-resolution image in overlapping windows of the model's input size (one method at a time).
    Every error a user can cause comes back as ``gr.Error`` with zsad's message; the app keeps serving.
    """

    def detect(image, class_name, method, threshold, tiles=False, progress=gr.Progress()):
        try:
            results, picture = run_detection(image, class_name, method, threshold, tiles, progress)
        except ZSADError as error:
            raise gr.Error(str(error), print_exception=False) from error
        first = results[0]
        return (
            (picture, zsad.images.bounded(first.overlay, display_side)),
            zsad.images.bounded(first.mask_image(), display_side),
            round(first.score, 4),
            report(results),
            [table_row(result) for result in results],
            gallery(results) if method == COMPARE else [],
            None,  # the last request's downloads no longer apply
            FullResolution.of(first, Path(image_name(image) or "image").stem),
        )

    def run_detection(image, class_name, method, threshold, tiles, progress) -> tuple[list[Detection], Image.Image]:
        if not tiles:
            loaded = zsad.images.read_image(image_source(image), name=image_name(image), max_side=display_side)
            if method == COMPARE:
                return list(detector.compare(loaded, class_name, threshold=threshold, display_side=display_side).values()), loaded.image
            return [detector.detect(loaded, class_name, method=method, threshold=threshold, display_side=display_side)], loaded.image
        if method == COMPARE:
            raise ZSADError("Tiles run one method at a time: pick a method instead of 'compare all'.")
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

    @functools.wraps(handler)  # Gradio reads the handler's signature (its progress parameter)
    def detect(*inputs):
        return files.replace_images(handler(*inputs), files.new_folder())

    return detect


def report(results: list[Detection]) -> str:
    """Markdown: the verdict of each method, its status, details and time."""
    lines = []
    for result in results:
        lines.append(
            f"### {display_name(result.method)} ({result.status}): **{result.verdict}**, "
            f"score {result.score:.3f} (threshold {result.threshold:.2f})"
        )
        if result.tiles:
            lines.append(f"- scored at full resolution in {result.tiles} tiles (score: the highest tile's)")
        if isinstance(result.details, GenCLIPImageDetails):
            lines.append(f"- {class_name_filter_decision(result.details.class_name)}")
        lines.extend(f"- {key}: {escaped(json.dumps(value))}" for key, value in result.details_dict().items())
    total = sum(result.seconds for result in results)
    lines.append(f"\nClass name used: “{escaped(results[0].class_name)}” · request took {total:.2f} s")
    return "\n".join(lines)


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
        items.append((result.mask_image(), f"{name}: mask at {result.threshold:.2f}"))
    return items


# ----- the page -------------------------------------------------------------------------------------


def example_rows() -> list[list]:
    """[image path, class name] rows from examples/examples.json (written by examples/make_examples.py)."""
    manifest = EXAMPLES_DIR / "examples.json"
    if not manifest.is_file():
        return []
    return [[str(EXAMPLES_DIR / row["image"]), row["class_name"]] for row in json.loads(manifest.read_text())]


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
    """Where the models run, e.g. "Runs on CPU · vision tower in bfloat16, text in float32"."""
    device = detector.device
    where = f"GPU {device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type.upper()
    vision = str(detector.backbone.dtype).removeprefix("torch.")
    return f"Runs on {where} · vision tower in {vision}, text in float32"


def build_demo(detector: AnomalyDetector, tiny: bool = False) -> gr.Blocks:
    """The Blocks page around ``detector`` (not launched)."""
    choices = method_choices(detector)
    with gr.Blocks(title="zsad: zero-shot anomaly detection") as demo:
        gr.Markdown(
            "# zsad: zero-shot anomaly detection\n"
            "Drop an image of a product, type what the product is, pick a method and see where the defect is."
        )
        notice = banner(detector, tiny)
        if notice:
            gr.Markdown(notice, elem_id="banner")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", sources=["upload", "clipboard"], type="filepath", elem_id="input-image")
                class_name = gr.Textbox(label="Product name", placeholder="e.g. bottle, metal nut, pcb", elem_id="class-name")
                method = gr.Radio(choices=choices, value=choices[0][1], label="Method", elem_id="method")
                threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Threshold (mask and verdict)")
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
        gr.Markdown(runtime(detector), elem_id="runtime")
        # preprocess=False: the raw upload goes to zsad's own image loader (clear messages for bad files).
        files = ImageFiles(keep=CONCURRENCY_LIMIT + 1)
        run.click(
            serving_files(make_handler(detector), files),
            inputs=[image, class_name, method, threshold, tiles],
            outputs=[overlay, mask, score, verdict, table, views, downloads, last],
            api_name="detect",
            preprocess=False,
        )
        full_resolution.click(serving_files(full_resolution_files, files), inputs=[last], outputs=[downloads], api_name="full_resolution")
    return demo


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
    demo = build_demo(detector, tiny=args.tiny)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=CONCURRENCY_LIMIT).launch()


if __name__ == "__main__":
    main()
