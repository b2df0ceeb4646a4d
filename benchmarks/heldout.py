"""Does training transfer to categories the model never saw? Offline check on synthetic data.

Trains a method with train/train.py on four synthetic categories, then compares the untrained (training-free)
and the trained model on the four others; then the same with the halves swapped. Reports, per held-out
category and averaged, the pixel AUROC of the final map and of every per-branch map the model reports
(GenCLIP's vision-enhanced and query-only branches), and the image AUROC. Uses the tiny random CLIP (real
weights cannot be downloaded here), so the numbers show whether training helps, not paper-level accuracy.

    python benchmarks/heldout.py --method stackclip [--epochs 5] [--clip-seed 0] [--image-size 112] [--set KEY=VALUE]
    python benchmarks/heldout.py --method genclip --epochs 2
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

import zsad
from zsad.data import load_dataset
from zsad.data.model_input import TrainingSet
from zsad.data.synthetic import generate
from zsad.metrics import image_metrics, pixel_metrics
from zsad.runtime.tiny_clip import save_tiny_clip

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import train as train_script  # noqa: E402 - train/ is a script folder beside zsad/

# Two folds: each half (two textures, two objects) is held out once while the model trains on the other.
FOLD_A = ["wood", "fabric", "disk", "capsule"]
FOLD_B = ["tile", "grid", "plate", "tube"]


def category_metrics(model, samples) -> dict[str, float]:
    """Pixel AUROC of the final map and of each branch map the output reports, and the image AUROC, for one category."""
    dataset = TrainingSet(samples, model.image_processor)
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        output = model.eval()(batch["pixel_values"], batch["class_names"])
    masks = list(batch["masks"].numpy() > 0)
    branches = [field.name for field in dataclasses.fields(output) if field.name.endswith("_map") and field.name != "anomaly_map"]
    maps = {"pixel_auroc": output.anomaly_map} | {f"pixel_auroc_{name.removesuffix('_map')}": getattr(output, name) for name in branches}
    metrics = {key: pixel_metrics(masks, list(value.float().numpy()))["pixel_auroc"] for key, value in maps.items()}
    metrics["image_auroc"] = image_metrics(batch["labels"].numpy(), output.image_score.numpy())["image_auroc"]
    return metrics


def evaluate(model, root: Path, categories: list[str]) -> dict[str, dict]:
    return {c: category_metrics(model, load_dataset("mvtec", root, categories=[c])) for c in categories}


def run_fold(args, work: Path, clip: Path, root: Path, train_categories, held_out) -> dict:
    """Train on ``train_categories``; metrics on ``held_out`` before and after training."""
    output_dir = work / f"run-{args.method}-{clip.name}-{'-'.join(train_categories)}"
    train_script.main([
        "--method", args.method, "--clip", str(clip), "--train-dataset", "mvtec", "--train-root", str(root),
        "--train-categories", *train_categories, "--output-dir", str(output_dir), "--epochs", str(args.epochs),
        "--image-size", str(args.image_size), "--seed", str(args.seed), "--cpu",
        *(argument for setting in args.settings for argument in ("--set", setting)),
    ])
    model_class = zsad.METHODS[args.method]
    trained = model_class.from_pretrained(output_dir / f"epoch-{args.epochs}")
    settings = dict(train_script.parse_setting(setting) for setting in args.settings)
    untrained = model_class.from_clip(str(clip), clip_model=trained.clip, image_size=args.image_size, **settings)
    untrained.prepare_for_training(train_categories)  # StackCLIP clusters the training names; others ignore it
    return {
        "train_categories": train_categories,
        # StackCLIP's CSP result (None for other methods): the clusters and the count criterion's score per n.
        "clusters": getattr(trained.config, "cluster_members", None),
        "cluster_count_scores": getattr(trained.config, "cluster_count_scores", None),
        "untrained": evaluate(untrained, root, held_out),
        "trained": evaluate(trained, root, held_out),
    }


def mean_table(folds: list[dict]) -> str:
    """Markdown table of the metrics averaged over every held-out category of every fold, in percent."""
    keys = list(next(iter(folds[0]["trained"].values())))
    rows = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in ("untrained", "trained"):
        values = [np.mean([m[key] for fold in folds for m in fold[name].values()]) for key in keys]
        rows.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=sorted(set(zsad.METHODS) - {"baseline"}))
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--clip-seed", type=int, default=0, help="seed of the tiny random CLIP's weights")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="config field for both models, as in train.py (e.g. fusion_weight=1.0)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=f"{args.method}-heldout-"))
    clip = save_tiny_clip(work / f"tiny-clip-{args.clip_seed}", seed=args.clip_seed)
    root = generate(work / "synthetic", categories=FOLD_A + FOLD_B, num_good=4, num_defective=12, image_size=128, seed=0)
    folds = [run_fold(args, work, clip, root, train, held_out)
             for train, held_out in ((FOLD_A, FOLD_B), (FOLD_B, FOLD_A))]
    (work / "heldout.json").write_text(json.dumps(folds, indent=2))
    for fold in folds:
        untrained, trained = (np.mean([m["pixel_auroc"] for m in fold[name].values()]) for name in ("untrained", "trained"))
        print(f"trained on {fold['train_categories']}: held-out pixel AUROC {untrained:.3f} untrained -> {trained:.3f} trained")
        if fold["clusters"] is not None:
            print(f"  clusters {fold['clusters']}, count criterion {fold['cluster_count_scores']}")
    print(f"\n{args.method}, held-out categories (both folds), {args.epochs} epochs at {args.image_size} px, percent:\n")
    print(mean_table(folds))


if __name__ == "__main__":
    main()
