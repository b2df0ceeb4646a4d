"""Do calibrated verdicts keep the false-alarm rate they state? Offline check on synthetic categories with the tiny CLIP.

For each category, n good references are drawn from train/good (several draws); the profile's leave-one-out scores
give the split-conformal threshold for each rate ALPHA the n images reach (n >= 1/ALPHA - 1), and the default rule
(the largest leave-one-out score + 0.01, bound 1/(n + 1)). Every held-out good image of test/good is scored against
the drawn references: the share reaching the threshold is the measured false-alarm rate, to compare with the stated
bound (n + 1 - k)/(n + 1); the share of test/<defect> images reaching it is the detection rate beside it. The
guarantee is on average over draws of the references, so rates are averaged over draws and categories.

    python benchmarks/bench_false_alarm.py [--categories disk wood tile] [--shots 4 9 19] [--rates 0.05 0.1 0.2]
                                           [--draws 5] [--held-out 100] [--defective 30] [--clip-seed 0]

The tiny CLIP has random weights: its scores show whether the stated rate holds, not how well real CLIP detects.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_class_line, machine_line

from zsad.conformal import conformal_rank, conformal_threshold
from zsad.data import load_dataset
from zsad.data.synthetic import generate
from zsad.inference import AnomalyDetector
from zsad.tiny_clip import save_tiny_clip

IMAGE_SIZE = 112  # the tiny CLIP's 8 x 8 patch grid
DEFAULT_RULE = "default (max + 0.01)"


def scores_of(detector: AnomalyDetector, paths: list[str], category: str, profile) -> np.ndarray:
    return np.array([d.score for d in detector.detect_batch(paths, category, "baseline", profile=profile)])


def one_draw(detector: AnomalyDetector, references: list[str], good: list[str], bad: list[str], category: str,
             rates: list[float]) -> dict[str, dict]:
    """{rule: {"bound", "false_alarm", "detection"}} for one draw of references."""
    profile = detector.build_profile("baseline", category, references)
    good_scores, bad_scores = scores_of(detector, good, category, profile), scores_of(detector, bad, category, profile)
    n = len(references)
    thresholds = {DEFAULT_RULE: (profile.calibration.image_threshold, profile.calibration.false_alarm_bound)}
    for rate in rates:
        if conformal_rank(n, rate) <= n:
            found = conformal_threshold(profile.calibration.good_scores, rate)
            thresholds[f"ALPHA {rate:g}"] = (found.threshold, found.bound)
    return {rule: {"bound": bound, "false_alarm": float(np.mean(good_scores >= threshold)),
                   "detection": float(np.mean(bad_scores >= threshold))} for rule, (threshold, bound) in thresholds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=["disk", "wood", "tile"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 9, 19])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--held-out", type=int, default=100, help="held-out good images per category (test/good)")
    parser.add_argument("--defective", type=int, default=30, help="defective images per category")
    parser.add_argument("--train-good", type=int, default=40, help="the pool references are drawn from (train/good)")
    parser.add_argument("--clip-seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if max(args.shots) > args.train_good:
        parser.error("--train-good must hold the largest --shots")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        root = generate(Path(work) / "data", categories=args.categories, num_good=args.held_out, num_defective=args.defective,
                        image_size=64, seed=0, num_train_good=args.train_good)
        detector = AnomalyDetector.load(clip=str(save_tiny_clip(Path(work) / "clip", seed=args.clip_seed)), image_size=IMAGE_SIZE)
        results: dict[tuple, list[dict]] = {}
        for category in args.categories:
            samples = load_dataset("mvtec", root, categories=[category])
            good = [str(s.image_path) for s in samples if not s.label]
            bad = [str(s.image_path) for s in samples if s.label]
            pool = sorted(str(path) for path in (root / category / "train" / "good").glob("*.png"))
            for n in args.shots:
                for draw in range(args.draws):
                    references = list(np.random.default_rng(1000 * n + draw).choice(pool, n, replace=False))
                    for rule, measured in one_draw(detector, references, good, bad, category, args.rates).items():
                        results.setdefault((n, rule), []).append(measured)
    rows = []
    for (n, rule), measured in sorted(results.items(), key=lambda item: (item[0][0], item[0][1] != DEFAULT_RULE, item[0][1])):
        false_alarms = [m["false_alarm"] for m in measured]
        rows.append({"n": n, "rule": rule, "bound": measured[0]["bound"], "false_alarm": float(np.mean(false_alarms)),
                     "false_alarm_range": [float(min(false_alarms)), float(max(false_alarms))],
                     "detection": float(np.mean([m["detection"] for m in measured])), "draws": len(measured)})
    print(f"{machine_line()}\n{cpu_class_line()}")
    print(f"{len(args.categories)} categories ({', '.join(args.categories)}), {args.draws} draws each, {args.held_out} held-out good and "
          f"{args.defective} defective images per category, tiny CLIP seed {args.clip_seed}; {time.perf_counter() - start:.0f} s\n")
    print("| n | rule | stated bound | false-alarm rate, mean (min-max over draws) | detection rate |")
    print("|---|---|---|---|---|")
    for row in rows:
        low, high = row["false_alarm_range"]
        print(f"| {row['n']} | {row['rule']} | {row['bound']:.3f} | {row['false_alarm']:.3f} ({low:.3f}-{high:.3f}) | "
              f"{row['detection']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
