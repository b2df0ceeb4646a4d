"""Does StackCLIP training transfer to categories it never saw? Offline check on synthetic data.

Trains StackCLIP with train/train.py on four synthetic categories, then compares the pixel AUROC of the
untrained (training-free) and the trained model on the four others; then the same with the halves swapped. Uses the tiny random CLIP
(real weights cannot be downloaded here), so the numbers show that training helps, not paper-level accuracy.

    python benchmarks/stackclip_heldout.py [--work-dir DIR] [--epochs 5] [--image-size 112] [--set KEY=VALUE]
"""

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from zsad import StackCLIPModel
from zsad.data import load_dataset
from zsad.data.synthetic import generate
from zsad.testing import save_tiny_clip

# Two folds: each half (two textures, two objects) is held out once while the model trains on the other.
FOLD_A = ["wood", "fabric", "disk", "capsule"]
FOLD_B = ["tile", "grid", "plate", "tube"]
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train.py"


def load_train_script():
    spec = importlib.util.spec_from_file_location("zsad_train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pixel_auroc_per_category(model, root: Path, categories: list[str], image_size: int, train_script) -> dict[str, float]:
    """Pixel AUROC of each category at the model's input size."""
    backbone = model.require_backbone()
    results = {}
    for category in categories:
        samples = load_dataset("mvtec", root, categories=[category])
        dataset = train_script.TrainingSet(samples, image_size, backbone.image_mean, backbone.image_std)
        batch = train_script.collate([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            maps = model.eval()(batch["pixel_values"], batch["class_names"]).anomaly_map
        results[category] = float(roc_auc_score(batch["masks"].flatten().numpy(), maps.flatten().numpy()))
    return results


def run_fold(args, work: Path, clip: Path, root: Path, train_categories, held_out, train_script) -> dict:
    """Train on ``train_categories``; pixel AUROC on ``held_out`` before and after training."""
    output_dir = work / f"run-{clip.name}-{'-'.join(train_categories)}"
    train_script.main([
        "--method", "stackclip", "--clip", str(clip), "--train-dataset", "mvtec", "--train-root", str(root),
        "--train-categories", *train_categories, "--output-dir", str(output_dir), "--epochs", str(args.epochs),
        "--image-size", str(args.image_size), "--seed", str(args.seed), "--cpu",
        *(argument for setting in args.settings for argument in ("--set", setting)),
    ])
    trained = StackCLIPModel.from_pretrained(output_dir / f"epoch-{args.epochs}")
    settings = dict(train_script.parse_setting(setting) for setting in args.settings)
    untrained = StackCLIPModel.from_clip(str(clip), clip_model=trained.clip, image_size=args.image_size, **settings)
    untrained.prepare_for_training(train_categories)
    return {
        "train_categories": train_categories,
        "clusters": trained.config.cluster_members,
        "untrained": pixel_auroc_per_category(untrained, root, held_out, args.image_size, train_script),
        "trained": pixel_auroc_per_category(trained, root, held_out, args.image_size, train_script),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--clip-seed", type=int, default=0, help="seed of the tiny random CLIP's weights")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="StackCLIP config field for both models, as in train.py (e.g. fusion_weight=1.0)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="stackclip-heldout-"))
    clip = save_tiny_clip(work / f"tiny-clip-{args.clip_seed}", seed=args.clip_seed)
    root = generate(work / "synthetic", categories=FOLD_A + FOLD_B, num_good=4, num_defective=12, image_size=128, seed=0)
    train_script = load_train_script()
    folds = [run_fold(args, work, clip, root, train, held_out, train_script)
             for train, held_out in ((FOLD_A, FOLD_B), (FOLD_B, FOLD_A))]
    print(json.dumps(folds, indent=2))
    for fold in folds:
        print(f"trained on {fold['train_categories']}: held-out pixel AUROC "
              f"{np.mean(list(fold['untrained'].values())):.4f} untrained -> {np.mean(list(fold['trained'].values())):.4f} trained")
    for name in ("untrained", "trained"):
        print(f"all held-out categories, {name}: {np.mean([v for fold in folds for v in fold[name].values()]):.4f}")


if __name__ == "__main__":
    main()
