"""Reference images on the full-size ViT-L/14@336 (random weights) at 518 px: per-image time with K = 1, 4, 16
references against zero-shot in the same run, the profile's memory, and the time to build a K = 4 profile.

    python benchmarks/bench_references.py [--repeats 3] [--precision auto|float32|bfloat16] [--cpu-share-only]

Zero-shot is timed before and after the reference runs and the faster of the two is the baseline, so a slow spell
of a shared machine cannot make the references look cheaper than they are. On a machine shared with other jobs,
wall times carry their noise; the CPU-time section (this process's CPU seconds, ``time.process_time``) measures the
work the reference map adds to one image's vision pass and heads, which other jobs do not change.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import cpu_class_line, full_size_inputs, machine_line, timed
from PIL import Image

from zsad.images import load_image, to_pixel_values
from zsad.inference import AnomalyDetector
from zsad.loading import PRECISIONS
from zsad.references import FusionScale, ReferenceMemory, apply_references

METHOD = "baseline"
CLASS_NAME = "metal nut"
SHOTS = (1, 4, 16)


def reference_images(image: str, count: int) -> list[Image.Image]:
    """``count`` different good parts: the test image shifted (compute does not depend on content)."""
    pixels = np.asarray(Image.open(image).convert("RGB"))
    return [Image.fromarray(np.roll(pixels, 7 * (index + 1), axis=1)) for index in range(count)]


def cpu_seconds(fn, repeats: int) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) per call of ``fn()``, after one warm-up call."""
    fn()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.process_time() - cpu) / repeats, (time.perf_counter() - wall) / repeats


def cpu_share(detector: AnomalyDetector, image: str, repeats: int) -> None:
    """CPU time of the reference map and fusion (random unit-norm memories of K images) against the vision pass
    and heads of one image."""
    model = detector.model(METHOD)
    pixel_values = to_pixel_values([load_image(image)], model.config.image_size, detector.backbone.image_mean, detector.backbone.image_std)
    with torch.inference_mode():
        features = model.encode_image(pixel_values)
        output = model(image_features=features, class_names=[CLASS_NAME])
        vision = cpu_seconds(lambda: model.encode_image(pixel_values), 1)
        heads = cpu_seconds(lambda: model(image_features=features, class_names=[CLASS_NAME]), repeats)
        print(f"\nCPU time per image: vision pass {vision[0]:.2f} s (wall {vision[1]:.2f} s), heads {heads[0]:.2f} s (wall {heads[1]:.2f} s)")
        print("| references K | reference map + fusion, CPU s (wall s) | vs zero-shot CPU time |\n|---|---|---|")
        patches, width = features.grid_size ** 2, features.layer_tokens[0].shape[-1]
        for shots in SHOTS:
            layers = [F.normalize(torch.randn(shots, patches, width), dim=-1).to(detector.backbone.dtype) for _ in features.layers]
            memory = ReferenceMemory(features.layers, layers, features.grid_size, features.image_size, features.vv_attention_from)
            scale = FusionScale(0.5, 0.5, 0.1, 0.5, 0.1)
            seconds = cpu_seconds(lambda: apply_references(memory, features, output.anomaly_map, output.global_score, scale, model.config),
                                  repeats)
            print(f"| {shots} | {seconds[0]:.2f} ({seconds[1]:.2f}) | {seconds[0] / (vision[0] + heads[0]):+.1%} |")


def main(workdir: str, repeats: int, precision: str, cpu_share_only: bool) -> None:
    clip_path, image = full_size_inputs(Path(workdir))
    print(machine_line())
    print(cpu_class_line())
    detector = AnomalyDetector.load(methods=[METHOD], clip=clip_path, precision=precision)
    print(f"backbone dtype {detector.backbone.dtype}, image size {detector.model(METHOD).config.image_size}, "
          f"layers {detector.model(METHOD).config.feature_layers}")
    cpu_share(detector, image, repeats)
    if cpu_share_only:
        return
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
    parser.add_argument("--cpu-share-only", action="store_true", help="only the CPU-time section (minutes, not half an hour)")
    args = parser.parse_args()
    main(args.workdir, args.repeats, args.precision, args.cpu_share_only)
