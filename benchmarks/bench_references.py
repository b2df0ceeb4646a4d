"""Reference images on the full-size ViT-L/14@336 (random weights) at 518 px: per-image time with K = 1, 4, 16
references against zero-shot in the same run, the profile's memory, and the time to build a K = 4 profile.

    python benchmarks/bench_references.py [--repeats 3] [--precision auto|float32|bfloat16]

Zero-shot is timed before and after the reference runs and the faster of the two is the baseline, so a slow spell
of a shared machine cannot make the references look cheaper than they are.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_class, full_size_inputs, machine_line, timed
from PIL import Image

from zsad.inference import AnomalyDetector
from zsad.loading import PRECISIONS, resolve_precision

METHOD = "baseline"
CLASS_NAME = "metal nut"
SHOTS = (1, 4, 16)


def reference_images(image: str, count: int) -> list[Image.Image]:
    """``count`` different good parts: the test image shifted (compute does not depend on content)."""
    pixels = np.asarray(Image.open(image).convert("RGB"))
    return [Image.fromarray(np.roll(pixels, 7 * (index + 1), axis=1)) for index in range(count)]


def main(workdir: str, repeats: int, precision: str) -> None:
    clip_path, image = full_size_inputs(Path(workdir))
    print(machine_line())
    print(f"CPU: {cpu_class()}")
    detector = AnomalyDetector.load(methods=[METHOD], clip=clip_path, dtype=resolve_precision(precision))
    print(f"backbone dtype {detector.backbone.dtype}, image size {detector.model(METHOD).config.image_size}, "
          f"layers {detector.model(METHOD).config.feature_layers}")
    detector.detect(image, CLASS_NAME, method=METHOD)  # text features, first-call allocations
    zero_shot_before = timed(lambda: detector.detect(image, CLASS_NAME, method=METHOD), repeats=repeats, warmup=0)
    references = reference_images(image, max(SHOTS))
    rows = []
    for shots in SHOTS:
        started = time.perf_counter()
        profile = detector.build_profile(METHOD, CLASS_NAME, references[:shots])
        build_seconds = time.perf_counter() - started
        seconds = timed(lambda: detector.detect(image, CLASS_NAME, method=METHOD, profile=profile), repeats=repeats)
        rows.append((shots, seconds, profile.memory.nbytes / 2**20, build_seconds))
    zero_shot_after = timed(lambda: detector.detect(image, CLASS_NAME, method=METHOD), repeats=repeats, warmup=0)
    zero_shot = min(zero_shot_before, zero_shot_after)
    print(f"\nzero-shot {METHOD}: {zero_shot:.3f} s per image (before {zero_shot_before:.3f} s, after {zero_shot_after:.3f} s)")
    print("\n| references K | s per image | vs zero-shot | profile memory (MB) | build profile (s, K forward passes + leave-one-out) |")
    print("|---|---|---|---|---|")
    for shots, seconds, megabytes, build_seconds in rows:
        print(f"| {shots} | {seconds:.3f} | {seconds / zero_shot - 1:+.1%} | {megabytes:.1f} | {build_seconds:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    args = parser.parse_args()
    main(args.workdir, args.repeats, args.precision)
