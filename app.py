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
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
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
from zsad.modeling.modeling_genclip import GenCLIPImageDetails
from zsad.modeling.prompting import clean_class_name, prompt_ensemble_features

COMPARE = "compare"
# Selector order and labels; methods registered later without an entry here are shown under their own name.
DISPLAY_NAMES = {"stackclip": "StackCLIP", "genclip": "GenCLIP", "baseline": "CLIP baseline"}
# One request at a time uses both cores of a CPU Space; a bounded queue tells the rest it is full.
QUEUE_SIZE = 16
CONCURRENCY_LIMIT = 1
# One model computation at a time: requests (one at a time from Gradio's queue) and the start-up warm-up take turns.
MODEL_LOCK = threading.Lock()
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
TABLE_HEADERS = ["method", "status", "score", "verdict", "anomalous pixels (%)", "seconds", "details"]


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
        help="backbone precision (env ZSAD_PRECISION); auto = bfloat16 where the hardware runs it natively, int8 vision linears elsewhere",
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


def make_handler(detector: AnomalyDetector):
    """``detect(image, class_name, method, threshold)`` -> (before/after pair, mask, score, report, table, gallery);
    the gallery (every method's overlay and mask) is filled in compare mode only.

    Every error a user can cause comes back as ``gr.Error`` with zsad's message; the app keeps serving.
    """

    def detect(image, class_name, method, threshold):
        try:
            picture = zsad.images.load_image(image_source(image))
            with MODEL_LOCK:
                if method == COMPARE:
                    results = list(detector.compare(picture, class_name, threshold=threshold).values())
                else:
                    results = [detector.detect(picture, class_name, method=method, threshold=threshold)]
        except ZSADError as error:
            raise gr.Error(str(error), print_exception=False) from error
        first = results[0]
        return (
            (picture, first.overlay),
            first.mask_image(),
            round(first.score, 4),
            report(results),
            [table_row(result) for result in results],
            gallery(results) if method == COMPARE else [],
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
        if isinstance(result.details, GenCLIPImageDetails):
            lines.append(f"- {class_name_filter_decision(result.details.class_name)}")
        lines.extend(f"- {key}: `{json.dumps(value)}`" for key, value in result.details_dict().items())
    total = sum(result.seconds for result in results)
    lines.append(f"\nClass name used: “{results[0].class_name}” · request took {total:.2f} s")
    return "\n".join(lines)


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
        items.append((result.mask_image(), f"{name}: mask at {result.threshold:.2f}"))
    return items


# ----- the page -------------------------------------------------------------------------------------


def example_rows() -> list[list]:
    """[image path, class name] rows from examples/examples.json (written by examples/make_examples.py)."""
    manifest = EXAMPLES_DIR / "examples.json"
    if not manifest.is_file():
        return []
    return [[str(EXAMPLES_DIR / row["image"]), row["class_name"]] for row in json.loads(manifest.read_text())]


def warm_example_names(detector: AnomalyDetector, names: list[str]) -> threading.Thread:
    """Encode the example names' prompt ensembles (baseline, StackCLIP) in the background, so a first click on an
    example does not wait for them; one name at a time under ``MODEL_LOCK``, so a request waits for one name at most."""

    def warm():
        for name in dict.fromkeys(names):
            with MODEL_LOCK:
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
        # preprocess=False: the raw upload goes to zsad's own image loader (clear messages for bad files).
        run.click(
            serving_files(make_handler(detector), ImageFiles(keep=CONCURRENCY_LIMIT + 1)),
            inputs=[image, class_name, method, threshold],
            outputs=[overlay, mask, score, verdict, table, views],
            api_name="detect",
            preprocess=False,
        )
    return demo


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
    warm_example_names(detector, [name for _, name in example_rows()])
    demo = build_demo(detector, tiny=args.tiny)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=CONCURRENCY_LIMIT).launch()


if __name__ == "__main__":
    main()
