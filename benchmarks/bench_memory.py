"""Peak memory of the Space's detector: every method loaded on one shared full-size CLIP ViT-L/14@336
(random weights), one detection per method, in float32 and in the fast precision (bfloat16 vision).

Prints peak RSS against the target 1.15 x the backbone's weight bytes + 400 MB. Each precision runs in a
fresh process so the peaks do not mix.

    python benchmarks/bench_memory.py [--workdir /tmp/zsad-bench]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MB = 1024 * 1024


def measure(clip_path: str, image: str, precision: str) -> dict:
    import torch

    from zsad.inference import AnomalyDetector

    detector = AnomalyDetector.load(clip=clip_path, dtype=getattr(torch, precision))
    for method in detector.method_names:
        detector.detect(image, "metal nut", method=method)
    weight_bytes = sum(p.numel() * p.element_size() for p in detector.backbone.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    return {"precision": precision, "methods": detector.method_names, "weight_bytes": weight_bytes, "peak_rss": peak}


def main(workdir: Path) -> None:
    from benchmarks.bench_inference import test_image
    from benchmarks.common import save_full_size_clip

    workdir.mkdir(parents=True, exist_ok=True)
    clip_path = str(save_full_size_clip(workdir / "clip-vit-large-patch14-336-random"))
    image = str(test_image(workdir / "part.png"))
    print("| precision | methods | backbone weights (MB) | peak RSS (MB) | target (MB) | peak / target |")
    print("|---|---|---|---|---|---|")
    for precision in ("float32", "bfloat16"):
        result = subprocess.run(
            [sys.executable, __file__, "--child", clip_path, image, precision], capture_output=True, text=True, check=True
        )
        row = json.loads(result.stdout.strip().splitlines()[-1])
        target = 1.15 * row["weight_bytes"] + 400 * MB
        print(
            f"| {precision} | {len(row['methods'])} | {row['weight_bytes'] / MB:.0f} | {row['peak_rss'] / MB:.0f} | "
            f"{target / MB:.0f} | {row['peak_rss'] / target:.2f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(*sys.argv[2:5])))
    else:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
        main(Path(parser.parse_args().workdir))
