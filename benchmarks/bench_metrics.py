"""Speed and memory of zsad.metrics.pixel_metrics against the straightforward reference (tests/metrics_reference.py).

    python benchmarks/bench_metrics.py [--maps 1000] [--reference-maps 100] [--visa]

Maps are float16 518x518 (what zsad.evaluation stores), masks hold a few rectangular regions on 2/3 of the
images. The reference (scikit-learn for AUROC / AP / F1-max, a per-threshold AUPRO loop over 200 evenly spaced
thresholds as in AnomalyCLIP / APRIL-GAN) runs on ``--reference-maps`` maps; its time is scaled linearly to
``--maps`` (its sorts are O(N log N), so the scaled time understates it). ``--visa`` also evaluates a
VisA-sized set (2,162 maps in 12 categories, all held in memory as zsad.evaluation does) and prints peak RSS.
"""

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zsad.metrics import pixel_metrics  # noqa: E402

from metrics_reference import reference_pixel_metrics  # noqa: E402

SIZE = 518


def make_maps(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for index in range(count):
        mask = np.zeros((SIZE, SIZE), bool)
        if index % 3:
            for _ in range(rng.integers(1, 4)):
                top, left = rng.integers(0, SIZE - 60, size=2)
                mask[top:top + rng.integers(5, 60), left:left + rng.integers(5, 60)] = True
        noise = rng.random((SIZE, SIZE), dtype=np.float32)
        maps.append((0.6 * noise + 0.4 * mask * rng.random()).astype(np.float16))
        masks.append(mask)
    return masks, maps


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
    args = parser.parse_args()

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
