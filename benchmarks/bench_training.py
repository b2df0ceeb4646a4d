"""Training step time at batch 8, 518 px, on the full-size CLIP ViT-L/14@336 (random weights): float32 vs
bf16 autocast (what ``train/train.py --bf16`` gets from Accelerate on the CPU) vs autocast with the vision
transformer stored in bfloat16 (``--bf16 --backbone-precision bfloat16``), per method.

    python benchmarks/bench_training.py [--batch-size 8] [--methods stackclip genclip]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zsad  # noqa: E402
from benchmarks.common import machine_line, save_full_size_clip, timed  # noqa: E402

IMAGE_SIZE = 518
TRAIN_NAMES = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut"]


def step_seconds(method: str, backbone, batch_size: int, bf16_autocast: bool) -> float:
    model = zsad.load_model(method, backbone=backbone, image_size=IMAGE_SIZE)
    model.prepare_for_training(TRAIN_NAMES)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.adapter_parameters() if p.requires_grad], lr=1e-3, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    masks = (torch.rand(batch_size, IMAGE_SIZE, IMAGE_SIZE, generator=generator) > 0.95).float()
    labels = torch.arange(batch_size) % 2
    names = [TRAIN_NAMES[i % len(TRAIN_NAMES)] for i in range(batch_size)]

    def step():
        # What Accelerate's autocast does on the CPU for train/train.py --bf16.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = model(pixels, class_names=names, masks=masks, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return timed(step, repeats=1, warmup=1)


def main(batch_size: int, methods: list[str], workdir: Path) -> None:
    clip_path = str(save_full_size_clip(workdir / "clip-vit-large-patch14-336-random"))
    backbone = zsad.load_backbone(clip_path)
    bf16_backbone = zsad.load_backbone(clip_path, dtype=torch.bfloat16)
    print(machine_line())
    print("| method | batch | float32 step (s) | bf16 autocast (s) | speed-up | bf16 backbone + autocast (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        exact = step_seconds(method, backbone, batch_size, bf16_autocast=False)
        autocast = step_seconds(method, backbone, batch_size, bf16_autocast=True)
        fastest = step_seconds(method, bf16_backbone, batch_size, bf16_autocast=True)
        print(f"| {method} | {batch_size} | {exact:.1f} | {autocast:.1f} | {exact / autocast:.2f}x | "
              f"{fastest:.1f} | {exact / fastest:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["stackclip", "genclip"])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    args = parser.parse_args()
    main(args.batch_size, args.methods, Path(args.workdir))
