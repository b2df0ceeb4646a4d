"""Inference on a CUDA GPU: the full-size CLIP ViT-L/14@336 architecture (random weights), 518 px, in the precision
``--precision auto`` picks there (bfloat16 on Ampere and newer, else float16).

Prints, all measured in this run, with the GPU and CPU named first:
- the floor: the backbone's vision forward for one image, and per image in a batch of 8;
- per method, end to end (file decode -> score and map at the original size): one image, a batch of 8 per image,
  and the first request with a new class name, as ratios to the floor; ``compare`` (every method, one vision pass);
- peak GPU memory of the detector holding every method;
- fidelity of the half-precision path against float32 on the same GPU (TF32 off): Pearson of maps, score difference.

    python benchmarks/bench_cuda.py [--repeats 5] [--workdir /tmp/zsad-bench] [--device cuda] [--clip PATH --image-size N]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cpu_class_line, full_size_inputs, machine_line, photo_like_image, timed  # noqa: E402
from zsad import AnomalyDetector  # noqa: E402

CLASS_NAME = "metal nut"
NEW_CLASS_NAMES = iter(f"part number {index}" for index in range(1000))  # a name never seen before, per call
BATCH = 8


def gpu_line(device: torch.device) -> str:
    if device.type != "cuda":
        return f"device: {device} (no GPU)"
    properties = torch.cuda.get_device_properties(device)
    return (f"GPU: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, compute capability {properties.major}.{properties.minor}, "
            f"CUDA {torch.version.cuda}, native bf16: {'yes' if torch.cuda.is_bf16_supported(including_emulation=False) else 'no'}")


def synchronized(fn, device: torch.device):
    """``fn`` followed by waiting for the GPU, so that timing covers the kernels it queued."""
    def run():
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    return run


def vision_floor(detector: AnomalyDetector, image_size: int, batch: int, repeats: int) -> float:
    """Seconds per image of the backbone's own vision forward at ``batch`` images."""
    backbone = detector.backbone
    pixels = torch.randn(batch, 3, image_size, image_size, device=backbone.device, dtype=backbone.dtype)
    with torch.inference_mode():
        forward = synchronized(lambda: backbone.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True), backbone.device)
        return timed(forward, repeats=repeats) / batch


def latency_table(detector: AnomalyDetector, image: str, image_size: int, repeats: int) -> None:
    device = detector.backbone.device
    floor = vision_floor(detector, image_size, 1, repeats)
    floor_batch = vision_floor(detector, image_size, BATCH, repeats)
    print(f"floor: vision forward, {str(detector.backbone.dtype).removeprefix('torch.')}, {image_size} px: "
          f"{floor * 1000:.1f} ms for one image, {floor_batch * 1000:.1f} ms per image in a batch of {BATCH}")
    print(f"\n| method | one image (ms) | / floor | batch of {BATCH}, per image (ms) | / batch floor | new class name (ms) |")
    print("|---|---|---|---|---|---|")
    images = [image] * BATCH
    for method in detector.method_names:
        one = timed(synchronized(lambda: detector.detect(image, CLASS_NAME, method=method), device), repeats=repeats)
        batch = timed(synchronized(lambda: detector.detect_batch(images, CLASS_NAME, method=method), device), repeats=repeats) / BATCH
        new_name = timed(synchronized(lambda: detector.detect(image, next(NEW_CLASS_NAMES), method=method), device), repeats=repeats, warmup=0)
        print(f"| {method} | {one * 1000:.1f} | {one / floor:.2f} | {batch * 1000:.1f} | {batch / floor_batch:.2f} | {new_name * 1000:.1f} |")
    compare = timed(synchronized(lambda: detector.compare(image, CLASS_NAME), device), repeats=repeats)
    print(f"\ncompare (all {len(detector.method_names)} methods, one vision pass): {compare * 1000:.1f} ms ({compare / floor:.2f}x the floor)")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def fidelity(fast: AnomalyDetector, clip_path: str, image: str, image_size: int, device: torch.device) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    exact = AnomalyDetector.load(clip=clip_path, precision="float32", image_size=image_size, device=device)
    print(f"\nfidelity of {str(fast.backbone.dtype).removeprefix('torch.')} against float32 on the same device:")
    for method in fast.method_names:
        a, b = fast.detect(image, CLASS_NAME, method=method), exact.detect(image, CLASS_NAME, method=method)
        print(f"  {method:10s} pearson {pearson(a.anomaly_map, b.anomaly_map):.5f}  score diff {abs(a.score - b.score):.4f}")


def main(workdir: str, repeats: int, device_name: str, clip: str | None, image_size: int) -> None:
    device = torch.device(device_name)
    if clip:
        image = str(photo_like_image(Path(workdir) / "part.png"))
    else:
        clip, image = full_size_inputs(Path(workdir))
    print(gpu_line(device))
    print(cpu_class_line())
    print(machine_line())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    detector = AnomalyDetector.load(clip=clip, precision="auto", image_size=image_size, device=device)
    latency_table(detector, image, image_size, repeats)
    if device.type == "cuda":
        print(f"peak GPU memory, detector with every method: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    fidelity(detector, clip, image, image_size, device)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--clip", help="another CLIP folder (default: the full-size random ViT-L/14@336)")
    parser.add_argument("--image-size", type=int, default=518)
    args = parser.parse_args()
    main(args.workdir, args.repeats, args.device, args.clip, args.image_size)
