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
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections import deque
from pathlib import Path

import gradio as gr
from PIL import Image

import zsad
from zsad.allocator import return_large_buffers_to_the_system
from zsad.errors import BackboneLoadError, ZSADError
from zsad.inference import DEFAULT_THRESHOLD, AnomalyDetector, Detection
from zsad.loading import PRECISIONS, resolve_precision
from zsad.modeling.class_name_filter import ClassNameChoice
from zsad.modeling.configuration_zsad_base import DEFAULT_CLIP
from zsad.modeling.lru_cache import LRUCache
from zsad.modeling.modeling_genclip import GenCLIPImageDetails
from zsad.modeling.prompting import clean_class_name
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
        help="backbone precision (env ZSAD_PRECISION); auto = bfloat16 where the hardware runs it natively",
    )
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


def load_detector(clip: str | None, checkpoints: dict[str, str], precision: str = "auto") -> AnomalyDetector:
    """The backbone once, then every registered method on it; exits with a hint if the backbone is missing."""
    try:
        return AnomalyDetector.load(
            methods=ordered_methods(zsad.METHODS), checkpoints=checkpoints, clip=clip, dtype=resolve_precision(precision)
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


def make_handler(detector: AnomalyDetector, profiles: ReferenceProfiles | None = None):
    """``detect(image, class_name, method, threshold, references, slider)`` -> (before/after pair, mask, score, report,
    table, gallery, slider); the gallery (every method's overlay and mask) is filled in compare mode only.

    With reference images, their profile (built once per set) adds the reference map and calibrated thresholds.
    ``slider`` is ``{"value": what the app last put on the threshold slider, "move": whether to put it there now}``:
    while the slider still shows that value the calibrated thresholds apply (and the slider moves to the calibrated
    value), once the user moves it the slider's own value does. Every error a user can cause comes back as
    ``gr.Error`` with zsad's message; the app keeps serving.
    """
    profiles = profiles or ReferenceProfiles(detector)

    def detect(image, class_name, method, threshold, references=None, slider=None):
        slider_set = (slider or {}).get("value", DEFAULT_THRESHOLD)
        try:
            picture = zsad.images.load_image(image_source(image))
            by_method = profiles.get(references, class_name, method)
            chosen = None if by_method and abs(threshold - slider_set) < 0.005 else threshold
            if method == COMPARE:
                results = list(detector.compare(picture, class_name, threshold=chosen, profiles=by_method).values())
            else:
                results = [detector.detect(picture, class_name, method=method, threshold=chosen, profile=by_method.get(method))]
        except ZSADError as error:
            raise gr.Error(str(error), print_exception=False) from error
        first = results[0]
        calibration = by_method[first.method].calibration if by_method else None
        return (
            (picture, first.overlay),
            first.mask_image(),
            round(first.score, 4),
            report(results, by_method),
            [table_row(result) for result in results],
            gallery(results) if method == COMPARE else [],
            {"value": round(calibration.image_threshold, 2), "move": True} if calibration and chosen is None
            else {"value": slider_set, "move": False},
        )

    return detect


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
            lines.append(f"- ⚠️ {result.note}")
        if isinstance(result.details, GenCLIPImageDetails):
            lines.append(f"- {class_name_filter_decision(result.details.class_name)}")
        lines.extend(f"- {key}: `{json.dumps(value)}`" for key, value in result.details_dict().items())
    total = sum(result.seconds for result in results)
    lines.append(f"\nClass name used: “{results[0].class_name}” · request took {total:.2f} s")
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
    if choice.kept:
        return f"Class name filter ({choice.mode}): kept “{choice.name_given}”{evidence}"
    return f"Class name filter ({choice.mode}): “{choice.name_given}” does not fit the image{evidence}; used “{choice.name_used}”"


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
                threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Threshold (mask and verdict)",
                                      elem_id="threshold")
                references = gr.File(label=f"Reference images of good parts (optional, up to {MAX_REFERENCES}): calibrated "
                                     "thresholds and a reference map", file_count="multiple", type="filepath", elem_id="references")
                run = gr.Button("Detect", variant="primary", elem_id="run")
            with gr.Column():
                overlay = gr.ImageSlider(label="Heat map (drag: original / overlay)", type="pil", elem_id="overlay")
                mask = gr.Image(label="Mask", type="pil", format="png", elem_id="mask")
                score = gr.Number(label="Anomaly score", precision=4, elem_id="score")
                verdict = gr.Markdown(elem_id="report")
        table = gr.Dataframe(headers=TABLE_HEADERS, label="Per method", interactive=False)
        views = gr.Gallery(label="Compare: every method's overlay and mask", columns=4, height=320, object_fit="contain")
        rows = example_rows()
        if rows:
            gr.Examples(rows, inputs=[image, class_name], label="Synthetic examples")
        # The threshold the app last put on the slider: while the slider shows it, calibrated thresholds apply.
        slider = gr.State({"value": DEFAULT_THRESHOLD, "move": False})
        # preprocess=False: the raw upload goes to zsad's own image loader (clear messages for bad files).
        run.click(
            serving_files(make_handler(detector), ImageFiles(keep=CONCURRENCY_LIMIT + 1)),
            inputs=[image, class_name, method, threshold, references, slider],
            outputs=[overlay, mask, score, verdict, table, views, slider],
            api_name="detect",
            preprocess=False,
        ).then(slider_at_calibrated_value, inputs=[slider, threshold], outputs=threshold, api_name=False)
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
        detector = load_detector(clip, configured_checkpoints(args.checkpoint), args.precision)
    except ZSADError as error:
        sys.exit(f"zsad app: {error}")
    demo = build_demo(detector, tiny=args.tiny)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=CONCURRENCY_LIMIT).launch()


if __name__ == "__main__":
    main()
