"""Mutual scoring on the full-size ViT-L/14@336 (random weights) at 518 px: for N images, the time per image and the
extra over the N vision passes, and the peak memory above the loaded detector.

    python benchmarks/bench_mutual.py [--sizes 8 32 200] [--precision float32|auto|bfloat16] [--max-compared 31]

The vision pass is timed on a real batch of images. Mutual scoring is then timed on N images' patch tokens made from
those passes plus a little noise (every image distinct; the work does not depend on the values), encoded and scored
group by group as ``detect_mutual`` does, so only one group's tokens exist at a time. Times are this process's CPU
seconds (``time.process_time``), which other jobs on a shared machine do not change, with wall seconds beside them.
Peak memory is the peak resident set (VmHWM, reset after loading) minus the resident set of the loaded detector.
"""

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import cpu_class_line, full_size_inputs, machine_line, proc_status_mb
from PIL import Image

from zsad import AnomalyDetector
from zsad.detection.mutual import MutualSettings, comparison_groups, mutual_scores
from zsad.runtime.images import to_pixel_values
from zsad_cli.choices import PRECISIONS

METHOD = "baseline"
VISION_BATCH = 4


def parts(image: str, count: int) -> list[Image.Image]:
    """``count`` different parts: the test image shifted."""
    pixels = np.asarray(Image.open(image).convert("RGB"))
    return [Image.fromarray(np.roll(pixels, 7 * (index + 1), axis=1)) for index in range(count)]


def reset_peak() -> None:
    """Make VmHWM restart from the current resident set (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def vision_seconds(detector: AnomalyDetector, pictures: list[Image.Image]) -> tuple[float, float, list[torch.Tensor]]:
    """(CPU s, wall s) per image of the vision pass over ``pictures`` in one batch, and each image's (L, P, D) tokens."""
    model = detector.model(METHOD)
    pixel_values = to_pixel_values(pictures, model.config.image_size, detector.backbone.image_mean, detector.backbone.image_std)
    with torch.inference_mode():
        model.encode_image(pixel_values[:1])  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        features = model.encode_image(pixel_values)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    tokens = list(torch.stack([features.patch_tokens(i) for i in range(len(features.layers))], dim=1))
    return cpu / len(pictures), wall / len(pictures), tokens


def group_tokens(seeds: list[torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
    """Distinct tokens for the images ``indices``: a vision pass's tokens plus noise seeded by the index."""
    return [seeds[i % len(seeds)] + 0.01 * torch.randn(seeds[0].shape, generator=torch.Generator().manual_seed(i)).to(seeds[0].dtype)
            for i in indices]


def mutual_seconds(seeds: list[torch.Tensor], count: int, settings: MutualSettings) -> tuple[float, float, int]:
    """(CPU s, wall s) of mutual scoring of ``count`` images, group by group, and the most images any was compared with."""
    keys = [f"{i:06d}" for i in range(count)]
    cpu, wall, most = 0.0, 0.0, 0
    for group in comparison_groups(keys, settings.max_compared):
        tokens = group_tokens(seeds, group)
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            scores = mutual_scores(tokens, replace(settings, max_compared=len(group) - 1), [keys[i] for i in group])
        cpu += time.process_time() - started_cpu
        wall += time.perf_counter() - started_wall
        most = max(most, int(scores.compared.max()))
        del tokens
    return cpu, wall, most


def main(workdir: str, sizes: list[int], precision: str, max_compared: int) -> None:
    clip_path, image = full_size_inputs(Path(workdir))
    print(machine_line())
    print(cpu_class_line())
    detector = AnomalyDetector.load(methods=[METHOD], clip=clip_path, precision=precision, device="cpu")
    config = detector.model(METHOD).config
    settings = MutualSettings(max_compared=max_compared)
    print(f"backbone dtype {detector.backbone.dtype}, image size {config.image_size}, layers {config.feature_layers}, "
          f"degrees {settings.degrees}, max_compared {settings.max_compared}")
    vision_cpu, vision_wall, seeds = vision_seconds(detector, parts(image, VISION_BATCH))
    print(f"vision pass: {vision_cpu:.2f} CPU s ({vision_wall:.2f} wall s) per image, batch of {VISION_BATCH}")
    detector_mb = proc_status_mb("VmRSS")
    print(f"resident with the detector loaded and one batch encoded: {detector_mb:.0f} MB")
    print("\n| N | compared with (most) | mutual CPU s per image (wall) | extra over the vision passes (CPU) | peak above detector (MB) |")
    print("|---|---|---|---|---|")
    for count in sizes:
        reset_peak()
        cpu, wall, most = mutual_seconds(seeds, count, settings)
        peak = proc_status_mb("VmHWM") - detector_mb
        print(f"| {count} | {most} | {cpu / count:.2f} ({wall / count:.2f}) | {cpu / (count * vision_cpu):+.0%} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 200])
    parser.add_argument("--precision", choices=PRECISIONS, default="float32")
    parser.add_argument("--max-compared", type=int, default=MutualSettings.max_compared)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    args = parser.parse_args()
    main(args.workdir, args.sizes, args.precision, args.max_compared)
