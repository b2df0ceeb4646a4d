"""Peak memory of ``zsad predict --mutual`` on lots of camera-size JPEGs, against plain ``zsad predict``.

Each run is a fresh ``zsad predict DIR --model baseline --clip TINY --out OUT [--mutual]`` under ``/usr/bin/time -v``
(its maximum resident set and wall time), on N photo-like 3-megapixel JPEGs (2048 x 1536, quality 90, each with a
patch of its own so that no two files are alike), overlays and masks written at full size.

    python benchmarks/bench_mutual_lot.py --sizes 20 80 320 [--plain 20 80] [--workdir /tmp/zsad-lot] [--full-size]

The tiny random CLIP leaves decoding, the maps at full size and PNG writing as the work that grows with the lot;
``--full-size`` runs the random full-size ViT-L/14@336 instead (minutes per lot on a few cores). An untimed warm-up
run first builds (or reads) the vision engine's cache, so that no measured run pays a graph build.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cpu_class_line, full_size_inputs  # noqa: E402

SIZE = (2048, 1536)  # 3 MP


def camera_lot(folder: Path, count: int) -> Path:
    """``count`` JPEGs: one photo-like base (gradient and texture), each with a noise patch at its own place."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = SIZE
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([120 + 60 * x, 110 + 50 * y, 100 + 40 * x * y], axis=-1)
    base += rng.normal(0, 10, size=(height // 8, width // 8, 1)).repeat(8, 0).repeat(8, 1)
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        if path.exists():
            continue
        pixels = base.copy()
        top, left = (i * 97) % (height - 64), (i * 193) % (width - 64)
        pixels[top:top + 64, left:left + 64] += rng.normal(0, 40, size=(64, 64, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def measured(command: list[str]) -> tuple[float, float]:
    """(peak resident MB, wall seconds) of ``command`` run under /usr/bin/time -v."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=True)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return peak_kb / 1024, seconds


def tiny_clip(folder: Path) -> Path:
    if not folder.exists():
        subprocess.run([sys.executable, "-m", "zsad", "tiny-clip", str(folder)], check=True, capture_output=True)
    return folder


def predict_command(lot: Path, clip: Path, out: Path, mutual: bool) -> list[str]:
    return [sys.executable, "-m", "zsad", "predict", str(lot), "--model", "baseline", "--clip", str(clip), "--out", str(out),
            "--device", "cpu", "--class-name", "plate", *(["--mutual"] if mutual else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 80, 320])
    parser.add_argument("--plain", type=int, nargs="*", default=[20, 80], help="lot sizes also run without --mutual")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/zsad-lot"))
    parser.add_argument("--full-size", action="store_true", help="the random full-size ViT-L/14@336 instead of the tiny CLIP")
    args = parser.parse_args()
    clip = Path(full_size_inputs(args.workdir)[0]) if args.full_size else tiny_clip(args.workdir / "tiny-clip")
    print(cpu_class_line())
    print(f"backbone: {'random ViT-L/14@336' if args.full_size else 'tiny random CLIP'}")
    warm_up = camera_lot(args.workdir / "warm-up", 2)
    peak, seconds = measured(predict_command(warm_up, clip, args.workdir / "out-warm-up", mutual=False))
    print(f"warm-up (not in the table): plain predict of 2 images, {peak:,.0f} MB, {seconds:.0f} s: it builds or reads the "
          "engine cache (`--engine auto`'s graph and recorded choice), so that every run below reads it")
    print("| N | mode | peak RSS MB | wall s | wall s per image |\n|---|---|---:|---:|---:|")
    for count in args.sizes:
        lot = camera_lot(args.workdir / f"lot-{count}", count)
        for mutual in ([True, False] if count in args.plain else [True]):
            out = args.workdir / f"out-{count}-{'mutual' if mutual else 'plain'}"
            peak, seconds = measured(predict_command(lot, clip, out, mutual))
            print(f"| {count} | {'--mutual' if mutual else 'plain'} | {peak:,.0f} | {seconds:.0f} | {seconds / count:.2f} |", flush=True)


if __name__ == "__main__":
    main()
