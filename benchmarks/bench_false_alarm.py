"""Do calibrated verdicts keep the false-alarm rate they state? Offline check on synthetic categories with the tiny CLIP.

For each category and n, ``--draws`` DISJOINT sets of n good references are drawn from train/good (the pool holds
draws x the largest n images, so no two draws share an image); each draw's profile gives, from its leave-one-out
scores, the split-conformal threshold for each rate ALPHA the n images reach (n >= 1/ALPHA - 1) and the default rule
(the largest leave-one-out score + 0.01, bound 1/(n + 1)). Every held-out good image of test/good is scored against
the draw's references as ``detect`` scores it: the share reaching the threshold is that draw's false-alarm rate, to
compare with the stated bound (n + 1 - k)/(n + 1); the share of defective images reaching it is the detection rate.

The guarantee holds on average over draws of the references: one draw's rate is a random variable (for k = n it is
Beta(1, n)-like: n = 19 gives mean 0.05, sd ~0.05), so the table gives the mean over all draws (categories x draws)
with its standard error over draws, to compare with the bound.

    python benchmarks/bench_false_alarm.py [--categories disk wood tile] [--shots 4 9 19] [--rates 0.05 0.1 0.2]
                                           [--draws 10] [--held-out 200] [--defective 30] [--clip-seed 0]

The tiny CLIP has random weights: its scores show whether the stated rate holds, not how well real CLIP detects.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_class_line, machine_line

from zsad import AnomalyDetector
from zsad.data import load_dataset
from zsad.data.synthetic import generate
from zsad.detection.calibration import read_images
from zsad.detection.conformal import conformal_rank, conformal_threshold
from zsad.runtime.tiny_clip import save_tiny_clip

IMAGE_SIZE = 112  # the tiny CLIP's 8 x 8 patch grid
METHOD = "baseline"
DEFAULT_RULE = "default (max + 0.01)"
BATCH = 32


class EncodedImages:
    """Held-out images encoded once, scored against each draw's profile as ``detect_batch`` scores them (the same
    ``model_features`` pass and ``run_heads`` fusion, without encoding the same images again for every draw)."""

    def __init__(self, detector: AnomalyDetector, paths: list[str], category: str):
        model = detector.model(METHOD)
        pictures = read_images(paths, "held-out")
        self.detector, self.names = detector, [detector.product_name(category, METHOD)] * BATCH
        self.batches = [detector.model_features(model, pictures[start:start + BATCH]) for start in range(0, len(pictures), BATCH)]

    def scores(self, profile) -> np.ndarray:
        scores = []
        for features in self.batches:
            _, result = self.detector.run_heads(METHOD, features, self.names[:features.batch_size], profile)
            scores.extend(result.image_score.float().cpu().tolist())
        return np.array(scores)


def disjoint_draws(pool: list[str], n: int, draws: int, seed: int) -> list[list[str]]:
    """``draws`` sets of ``n`` images of ``pool``, no image in two sets."""
    shuffled = list(np.random.default_rng(seed).permutation(pool))
    return [shuffled[draw * n:(draw + 1) * n] for draw in range(draws)]


def one_draw(detector: AnomalyDetector, references: list[str], good: EncodedImages, bad: EncodedImages, category: str,
             rates: list[float]) -> dict[str, dict]:
    """{rule: {"bound", "false_alarm", "detection"}} for one draw of references."""
    profile = detector.build_profile(METHOD, category, references)
    good_scores, bad_scores = good.scores(profile), bad.scores(profile)
    n = len(references)
    thresholds = {DEFAULT_RULE: (profile.calibration.image_threshold, profile.calibration.false_alarm_bound)}
    for rate in rates:
        if conformal_rank(n, rate) <= n:
            found = conformal_threshold(profile.calibration.good_scores, rate)
            thresholds[f"ALPHA {rate:g}"] = (found.threshold, found.bound)
    return {rule: {"bound": bound, "false_alarm": float(np.mean(good_scores >= threshold)),
                   "detection": float(np.mean(bad_scores >= threshold))} for rule, (threshold, bound) in thresholds.items()}


def summary_rows(results: dict[tuple, list[dict]]) -> list[dict]:
    rows = []
    for (n, rule), measured in sorted(results.items(), key=lambda item: (item[0][0], item[0][1] != DEFAULT_RULE, item[0][1])):
        false_alarms = np.array([m["false_alarm"] for m in measured])
        error = float(false_alarms.std(ddof=1) / np.sqrt(len(false_alarms))) if len(false_alarms) > 1 else float("nan")
        rows.append({"n": n, "rule": rule, "bound": measured[0]["bound"], "false_alarm": float(false_alarms.mean()),
                     "standard_error": error, "false_alarm_range": [float(false_alarms.min()), float(false_alarms.max())],
                     "detection": float(np.mean([m["detection"] for m in measured])), "draws": len(measured)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=["disk", "wood", "tile"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 9, 19])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--draws", type=int, default=10, help="disjoint reference sets per category and n")
    parser.add_argument("--held-out", type=int, default=200, help="held-out good images per category (test/good)")
    parser.add_argument("--defective", type=int, default=30, help="defective images per category")
    parser.add_argument("--clip-seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    pool_size = args.draws * max(args.shots)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        root = generate(Path(work) / "data", categories=args.categories, num_good=args.held_out, num_defective=args.defective,
                        image_size=64, seed=0, num_train_good=pool_size)
        detector = AnomalyDetector.load(clip=str(save_tiny_clip(Path(work) / "clip", seed=args.clip_seed)), image_size=IMAGE_SIZE)
        results: dict[tuple, list[dict]] = {}
        for category in args.categories:
            samples = load_dataset("mvtec", root, categories=[category])
            good = EncodedImages(detector, [str(s.image_path) for s in samples if not s.label], category)
            bad = EncodedImages(detector, [str(s.image_path) for s in samples if s.label], category)
            pool = sorted(str(path) for path in (root / category / "train" / "good").glob("*.png"))
            for n in args.shots:
                for references in disjoint_draws(pool, n, args.draws, seed=n):
                    for rule, measured in one_draw(detector, references, good, bad, category, args.rates).items():
                        results.setdefault((n, rule), []).append(measured)
    rows = summary_rows(results)
    print(f"{machine_line()}\n{cpu_class_line()}")
    print(f"{len(args.categories)} categories ({', '.join(args.categories)}), {args.draws} disjoint draws each from {pool_size} "
          f"train/good images, {args.held_out} held-out good and {args.defective} defective images per category, tiny CLIP "
          f"seed {args.clip_seed}; {time.perf_counter() - start:.0f} s\n")
    print("| n | rule | stated bound | false-alarm rate, mean ± s.e. over draws (min-max) | draws | detection rate |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        low, high = row["false_alarm_range"]
        print(f"| {row['n']} | {row['rule']} | {row['bound']:.3f} | {row['false_alarm']:.3f} ± {row['standard_error']:.3f} "
              f"({low:.3f}-{high:.3f}) | {row['draws']} | {row['detection']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
