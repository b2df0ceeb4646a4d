"""Does GenCLIP training transfer to categories it never saw? Offline check on synthetic data, per branch.

Trains GenCLIP with train/train.py on four synthetic categories and compares the untrained (training-free)
and the trained model on the four others, then the same with the halves swapped. Reports pixel AUROC of
the vision-enhanced branch alone, the query-only branch alone and the fused map, and the fused image AUROC,
per category then averaged. Uses the tiny random CLIP (real weights cannot be downloaded here), so the
numbers show whether training helps, not paper-level accuracy.

    python benchmarks/genclip_heldout.py [--work-dir DIR] [--epochs 2] [--image-size 112] [--set KEY=VALUE]
"""

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from zsad import GenCLIPModel
from zsad.data import load_dataset
from zsad.data.synthetic import generate
from zsad.testing import save_tiny_clip

FOLD_A = ["wood", "fabric", "disk", "capsule"]
FOLD_B = ["tile", "grid", "plate", "tube"]
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train.py"
PIXEL_MAPS = {
    "pixel_auroc_vision": lambda output: output.details["vision_map"],
    "pixel_auroc_query": lambda output: output.details["query_map"],
    "pixel_auroc_fused": lambda output: output.anomaly_map,
}


def load_train_script():
    spec = importlib.util.spec_from_file_location("zsad_train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def category_metrics(model, samples, train_script) -> dict[str, float]:
    """Pixel AUROC of each branch and fused, image AUROC of the fused score, for one category."""
    backbone = model.require_backbone()
    dataset = train_script.TrainingSet(samples, model.config.image_size, backbone.image_mean, backbone.image_std)
    batch = train_script.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        output = model.eval()(batch["pixel_values"], batch["class_names"])
    masks = batch["masks"].flatten().numpy()
    metrics = {key: float(roc_auc_score(masks, get(output).flatten().numpy())) for key, get in PIXEL_MAPS.items()}
    metrics["image_auroc_fused"] = float(roc_auc_score(batch["labels"].numpy(), output.image_score.numpy()))
    return metrics


def evaluate(model, root: Path, categories: list[str], train_script) -> dict[str, dict]:
    return {c: category_metrics(model, load_dataset("mvtec", root, categories=[c]), train_script) for c in categories}


def run_fold(args, work: Path, clip: Path, root: Path, train_categories, held_out, train_script) -> dict:
    """Train on ``train_categories``; metrics on ``held_out`` before and after training."""
    output_dir = work / f"run-{'-'.join(train_categories)}"
    train_script.main([
        "--method", "genclip", "--clip", str(clip), "--train-dataset", "mvtec", "--train-root", str(root),
        "--train-categories", *train_categories, "--output-dir", str(output_dir), "--epochs", str(args.epochs),
        "--image-size", str(args.image_size), "--seed", str(args.seed), "--cpu",
        *(argument for setting in args.settings for argument in ("--set", setting)),
    ])
    trained = GenCLIPModel.from_pretrained(output_dir / f"epoch-{args.epochs}")
    settings = dict(train_script.parse_setting(setting) for setting in args.settings)
    untrained = GenCLIPModel.from_clip(str(clip), clip_model=trained.clip, image_size=args.image_size, **settings)
    return {
        "train_categories": train_categories,
        "untrained": evaluate(untrained, root, held_out, train_script),
        "trained": evaluate(trained, root, held_out, train_script),
    }


def mean_table(folds: list[dict]) -> str:
    """Markdown table of the metrics averaged over every held-out category of every fold."""
    keys = [*PIXEL_MAPS, "image_auroc_fused"]
    rows = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in ("untrained", "trained"):
        values = [np.mean([m[key] for fold in folds for m in fold[name].values()]) for key in keys]
        rows.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="GenCLIP config field for both models, as in train.py (e.g. branch_weight=1.0)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="genclip-heldout-"))
    clip = save_tiny_clip(work / "tiny-clip")
    root = generate(work / "synthetic", categories=FOLD_A + FOLD_B, num_good=4, num_defective=12, image_size=128, seed=0)
    train_script = load_train_script()
    folds = [run_fold(args, work, clip, root, train, held_out, train_script)
             for train, held_out in ((FOLD_A, FOLD_B), (FOLD_B, FOLD_A))]
    (work / "genclip_heldout.json").write_text(json.dumps(folds, indent=2))
    print(json.dumps(folds, indent=2))
    print(f"\nHeld-out categories (both folds), {args.epochs} epochs at {args.image_size} px, percent:\n")
    print(mean_table(folds))


if __name__ == "__main__":
    main()
