"""Speed and memory of zsad.metrics.pixel_metrics against the straightforward reference (tests/metrics_reference.py).

    python benchmarks/bench_metrics.py [--maps 1000] [--reference-maps 100] [--visa] [--dtype-maps 200] [--repeats 3]

Maps are float16 518x518 (what zsad.evaluation.protocol stores), masks hold a few rectangular regions on 2/3 of the
images. The dtype comparison times the same ``--dtype-maps`` 256x256 maps as float32 and rounded to float16,
median of ``--repeats`` alternating runs, for three kinds of maps: full-precision noise (nearly every score distinct, the worst
case for ranking), model-like smooth maps with a large tie at 0, and a heavy tail (exp of the noise). The
reference (scikit-learn for AUROC / AP / F1-max, a per-threshold AUPRO loop over 200 evenly spaced thresholds
as in AnomalyCLIP / APRIL-GAN) runs on ``--reference-maps`` maps; its time is scaled linearly to
``--maps`` (its sorts are O(N log N), so the scaled time understates it). ``--visa`` also evaluates a
VisA-sized set (2,162 maps in 12 categories, all held in memory as zsad.evaluation.protocol does) and prints peak RSS.
"""

import argparse
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_class_line, machine_line, run_times  # noqa: E402
from zsad.metrics import pixel_metrics  # noqa: E402

from metrics_reference import reference_pixel_metrics  # noqa: E402

SIZE = 518
DTYPE_SIZE = 256


def make_maps(count: int, seed: int = 0, size: int = SIZE, dtype=np.float16) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for index in range(count):
        mask = np.zeros((size, size), bool)
        if index % 3:
            for _ in range(rng.integers(1, 4)):
                top, left = rng.integers(0, size - 60, size=2)
                mask[top:top + rng.integers(5, 60), left:left + rng.integers(5, 60)] = True
        noise = rng.random((size, size), dtype=np.float32)
        maps.append((0.6 * noise + 0.4 * mask * rng.random()).astype(dtype))
        masks.append(mask)
    return masks, maps


def make_smooth_maps(count: int, seed: int = 0, size: int = DTYPE_SIZE) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Model-like float32 maps: bilinear upsampling of a 37x37 patch grid, a third of the pixels clipped to 0
    (one huge tie far below the rest), defects raised by a per-image amount."""
    masks, _ = make_maps(count, seed, size)
    rng = np.random.default_rng(seed + 1)
    maps = []
    for mask in masks:
        patches = rng.random((37, 37), dtype=np.float32)
        smooth = ndimage.zoom(patches, size / 37, order=1)[:size, :size]
        maps.append(np.maximum(smooth - 0.33, 0).astype(np.float32) + np.float32(0.3 * rng.random()) * mask)
    return masks, maps


def compare_dtypes(count: int, repeats: int) -> None:
    """pixel_metrics on the same maps as float32 and rounded to float16, timed in this run."""
    noise_masks, noise = make_maps(count, size=DTYPE_SIZE, dtype=np.float32)
    kinds = (("noise", (noise_masks, noise)), ("smooth", make_smooth_maps(count)),
             ("heavy-tailed (exp(8 x noise))", (noise_masks, [np.exp(8 * m) for m in noise])))
    for kind, (masks, maps32) in kinds:
        maps16 = [m.astype(np.float16) for m in maps32]
        # Alternating the two, so that a slower stretch of a shared machine hits both alike.
        runs = [(run_times(lambda: pixel_metrics(masks, maps16), 1), run_times(lambda: pixel_metrics(masks, maps32), 1)) for _ in range(repeats)]
        seconds16, seconds32 = (statistics.median(times[0] for times in column) for column in zip(*runs))
        distinct = np.unique(np.concatenate([m.ravel() for m in maps32])).size
        print(f"{count} {kind} maps of {DTYPE_SIZE}x{DTYPE_SIZE} ({distinct:,} distinct float32 scores), median of {repeats}: "
              f"float16 {seconds16:.3f} s, float32 {seconds32:.3f} s, ratio float32 / float16 {seconds32 / seconds16:.2f}x")
    small = [m[:64, :64] for m in masks[:20]]
    ours, reference = pixel_metrics(small, [m[:64, :64] for m in maps32[:20]]), reference_pixel_metrics(small, [m[:64, :64] for m in maps32[:20]])
    print("  float32 against the exact reference on 20 crops of 64x64 (every distinct score a threshold): "
          + ", ".join(f"{k} {abs(ours[k] - reference[k]):.1e}" for k in ours))


def timed(function, *args):
    tracemalloc.start()
    started = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--maps", type=int, default=1000)
    parser.add_argument("--reference-maps", type=int, default=100)
    parser.add_argument("--visa", action="store_true")
    parser.add_argument("--dtype-maps", type=int, default=200, help="maps for the float32 / float16 comparison")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{cpu_class_line()}; {machine_line()}; numpy {np.__version__}")
    compare_dtypes(args.dtype_maps, args.repeats)

    masks, maps = make_maps(args.maps)
    ours, seconds, peak = timed(pixel_metrics, masks, maps)
    print(f"zsad.metrics on {args.maps} maps of {SIZE}x{SIZE}: {seconds:.1f} s, peak extra memory {peak / 2**20:.0f} MiB")
    print("  " + ", ".join(f"{k} {v:.4f}" for k, v in ours.items()))

    count = args.reference_maps
    thresholds = np.linspace(min(float(m.min()) for m in maps[:count]), max(float(m.max()) for m in maps[:count]), 200)
    small, small_seconds, _ = timed(pixel_metrics, masks[:count], maps[:count])
    reference, ref_seconds, ref_peak = timed(reference_pixel_metrics, masks[:count], maps[:count], thresholds)
    scaled = ref_seconds * args.maps / count
    print(f"reference on {count} maps: {ref_seconds:.1f} s (peak extra memory {ref_peak / 2**20:.0f} MiB) "
          f"-> ~{scaled:.0f} s for {args.maps}; zsad on the same {count} maps: {small_seconds:.2f} s")
    print("  differences on those maps: " + ", ".join(f"{k} {abs(small[k] - reference[k]):.1e}" for k in small)
          + " (AUPRO: the reference uses 200 thresholds)")
    print(f"speed ratio (scaled reference / zsad, {args.maps} maps): {scaled / seconds:.0f}x")
    del masks, maps

    if args.visa:
        masks, maps = make_maps(2162, seed=1)
        started = time.perf_counter()
        for category in np.array_split(np.arange(2162), 12):
            pixel_metrics([masks[i] for i in category], [maps[i] for i in category])
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"VisA-sized (2,162 maps held, metrics per category of 12): {time.perf_counter() - started:.1f} s, peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
