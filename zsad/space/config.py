"""What the Space is configured with: the command line, checkpoints from the environment, the loaded detector."""

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import zsad
from zsad.detection.detector import AnomalyDetector
from zsad.modeling.configuration_zsad_base import DEFAULT_CLIP
from zsad.modeling.exceptions import ZSADError
from zsad.runtime.errors import BackboneLoadError
from zsad.runtime.loading import Runtime
from zsad_cli import add_device_argument, add_engine_argument
from zsad_cli.choices import PRECISIONS

COMPARE = "compare"
# Selector order and labels; methods registered later without an entry here are shown under their own name.
DISPLAY_NAMES = {"anomalyclip": "AnomalyCLIP", "stackclip": "StackCLIP", "genclip": "GenCLIP", "baseline": "CLIP baseline"}
# One request at a time uses both cores of a CPU Space; a bounded queue tells the rest it is full.
QUEUE_SIZE = 16
CONCURRENCY_LIMIT = 1
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
# Longest side of the images the page shows: the model sees 518 px anyway, and a camera's 12 MP would cost seconds
# in overlays and image encoding; the full-resolution map and mask are offered as files. At 1000, a 4000x3000 JPEG
# decodes at 1/4 scale straight to this size (benchmarks/bench_camera.py).
DISPLAY_SIDE = 1000
# Reference images per request: 19 distinct good images reach a false-alarm rate of 1 in 20 (docs/METHODS.md,
# "Calibrated false-alarm rate"), and one more leaves room for a spare. Each adds its patch features at every tapped
# layer to the memory (about 11 MB at 518 px in bfloat16, 22 MB in float32) and to the nearest-neighbour search.
MAX_REFERENCES = 20
# The decoded pixels of one set of references, all held at once while its profile is built: what 16 references at
# DISPLAY_SIDE took. Each reference is decoded with its longest side at most REFERENCE_SIDE (894 px for 20), which
# keeps the set within this budget and stays above the 518 px the model sees.
REFERENCE_DECODED_PIXELS = 16 * DISPLAY_SIDE**2
REFERENCE_SIDE = math.isqrt(REFERENCE_DECODED_PIXELS // MAX_REFERENCES)
# Profiles kept for the sets of references seen last (20 references at 518 px in bfloat16: 225 MB per set, shared by
# the methods).
PROFILE_CACHE_SIZE = 2
# Largest file one upload may be (Gradio refuses a larger one before it reaches zsad): a batch's zip within the batch
# caps' megabytes fits; a 24 MP camera JPEG is about 10 MB.
MAX_FILE_SIZE = "200mb"
FILE_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


@dataclass(frozen=True)
class BatchCaps:
    """What one batch may hold, checked before anything is decoded: images, megabytes of image files (zips counted
    uncompressed), megapixels of one image (read from its header) and of the whole batch."""

    max_images: int = 100
    max_megabytes: float = 200.0
    max_image_megapixels: float = 24.0
    max_megapixels: float = 600.0


@dataclass(frozen=True)
class ReferenceCaps:
    """What one set of reference images may hold: images, and megapixels in all (read from the headers); each is
    decoded on its own with its longest side at most ``max_side``."""

    max_images: int = MAX_REFERENCES
    max_megapixels: float = 800.0
    max_side: int = REFERENCE_SIDE


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
        "Methods without one run untrained; AnomalyCLIP is offered only with one (e.g. anomalyclip=DIR from "
        "`zsad convert anomalyclip`).",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=os.environ.get("ZSAD_PRECISION", "auto"),
        help="vision backbone precision (env ZSAD_PRECISION); auto = bfloat16 where the device runs it natively, "
        "float16 on GPUs without bfloat16, int8 vision linears on other CPUs",
    )
    add_device_argument(parser)
    add_engine_argument(parser)
    parser.add_argument("--tiny", action="store_true", help="use a tiny random CLIP (no download; for UI work only)")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="requests waiting before 'queue full'")
    parser.add_argument("--batch-max-images", type=int, default=BatchCaps.max_images, help="most images in one batch (Batch tab)")
    parser.add_argument("--batch-max-megabytes", type=float, default=BatchCaps.max_megabytes,
                        help="most megabytes of images in one batch, zips counted uncompressed")
    parser.add_argument("--batch-max-megapixels", type=float, default=BatchCaps.max_megapixels,
                        help="most megapixels in one batch, all images together (read from the headers)")
    parser.add_argument("--max-file-size", type=file_size, default=os.environ.get("ZSAD_MAX_FILE_SIZE", MAX_FILE_SIZE),
                        help=f"largest file one upload may be, e.g. 50mb or 1gb (env ZSAD_MAX_FILE_SIZE; default {MAX_FILE_SIZE})")
    return parser


def file_size(text: str) -> int:
    """Bytes from ``<number><unit>`` (b, kb, mb, gb; 1 kb = 1024 b), as Gradio's ``max_file_size`` reads it."""
    match = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb)\s*", str(text).lower())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 200mb or 1gb (units b, kb, mb, gb), got {text!r}")
    return int(match[1]) * FILE_SIZE_UNITS[match[2]]


def launch_options(args: argparse.Namespace) -> dict:
    """What ``Blocks.launch`` is given: the upload size limit."""
    return {"max_file_size": args.max_file_size}


def batch_caps(args: argparse.Namespace) -> BatchCaps:
    return BatchCaps(args.batch_max_images, args.batch_max_megabytes, max_megapixels=args.batch_max_megapixels)


def configured_checkpoints(flags: list[str], environ=os.environ) -> dict[str, str]:
    """Checkpoints from ZSAD_<METHOD>_CHECKPOINT variables, overridden by --checkpoint METHOD=PATH flags."""
    checkpoints = {method: environ[checkpoint_variable(method)] for method in zsad.METHODS if environ.get(checkpoint_variable(method))}
    for flag in flags:
        method, separator, path = flag.partition("=")
        if not separator or not path:
            raise ZSADError(f"--checkpoint takes METHOD=PATH, got '{flag}'; methods: {', '.join(zsad.METHODS)}.")
        checkpoints[method.strip().lower()] = path
    return checkpoints


def load_detector(clip: str | None, checkpoints: dict[str, str], precision: str = "auto", device: str = "auto",
                  engine: str | None = None) -> AnomalyDetector:
    """The backbone once, then every registered method on it; exits with a hint if the backbone is missing."""
    try:
        return AnomalyDetector.load(methods=offered_methods(checkpoints), checkpoints=checkpoints, clip=clip,
                                    runtime=Runtime.resolve(device, precision), engine=engine)
    except BackboneLoadError as error:
        sys.exit(
            f"zsad app: could not load the CLIP backbone '{error.clip}' (offline, or not in the Hugging Face cache?).\n"
            "Point the app at a local copy with --clip PATH (or ZSAD_CLIP=PATH), "
            "or start it with --tiny (a tiny random CLIP) for UI work."
        )


def offered_methods(checkpoints: dict[str, str]) -> list[str]:
    """The methods the Space offers, in selector order: each one with a checkpoint, and the others that work
    untrained (not AnomalyCLIP, whose untrained prompts are a random start)."""
    return [method for method in ordered_methods(zsad.METHODS) if method in checkpoints or zsad.METHODS[method].works_untrained]


def ordered_methods(methods) -> list[str]:
    known = [method for method in DISPLAY_NAMES if method in methods]
    return known + [method for method in methods if method not in DISPLAY_NAMES]


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)
