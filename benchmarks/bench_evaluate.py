"""Throughput of ``zsad evaluate`` at batch 8 on the full-size CLIP ViT-L/14@336 (random weights), 518 px,
with 1 process and with 2 processes (``accelerate launch --multi_gpu --num_processes 2`` on the CPU, gloo),
bfloat16 vision.

    python benchmarks/bench_evaluate.py [--images-per-category 8]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_line, save_full_size_clip  # noqa: E402
from zsad.data.synthetic import generate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run(command: list[str]) -> float:
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, env=env)
    return time.perf_counter() - started


def main(images_per_category: int, workdir: Path) -> None:
    clip_path = str(save_full_size_clip(workdir / "clip-vit-large-patch14-336-random"))
    root = generate(workdir / "synthetic", categories=["wood", "capsule"], num_good=images_per_category // 2,
                    num_defective=images_per_category - images_per_category // 2, image_size=256, seed=0)
    arguments = ["train/evaluate.py", "--model", "baseline", "--clip", clip_path, "--dataset", "mvtec", "--root", str(root),
                 "--batch-size", "8", "--precision", "bfloat16"]
    count = 2 * images_per_category
    print(machine_line())
    print("| processes | images | seconds (incl. start-up and model load) | images / s |\n|---|---|---|---|")
    for processes in (1, 2):
        out = workdir / f"evaluation-{processes}"
        # Several CPU processes talk over gloo; `accelerate launch --cpu` alone would start just one.
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        seconds = run([*launcher, *arguments, "--out", str(out)])
        report = json.loads((out / "evaluation.json").read_text())
        assert report["num_processes"] == processes and report["num_images"] == count, report
        print(f"| {processes} | {count} | {seconds:.1f} | {count / seconds:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-category", type=int, default=8)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    args = parser.parse_args()
    main(args.images_per_category, Path(args.workdir))
