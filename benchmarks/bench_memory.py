"""Peak memory of the Space's detector: every method loaded on one shared full-size CLIP ViT-L/14@336
(random weights), one detection per method, in float32 and in the fast precision (bfloat16 vision).

Prints peak RSS against the target 1.15 x the backbone's weight bytes + 400 MB, while serving (peak reset
after loading) and while loading (which also counts the float32 checkpoint's memory-mapped file pages, clean
page cache the kernel can drop). Each precision runs in a fresh process so the peaks do not mix.

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
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    for method in detector.method_names:
        detector.detect(image, "metal nut", method=method)
    weight_bytes = sum(p.numel() * p.element_size() for p in detector.backbone.parameters())
    return {"precision": precision, "methods": detector.method_names, "weight_bytes": weight_bytes,
            "load_peak": load_peak, "serving_peak": _peak_rss_since_reset()}


def _peak_rss_since_reset() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(workdir: Path) -> None:
    from benchmarks.bench_inference import test_image
    from benchmarks.common import save_full_size_clip

    workdir.mkdir(parents=True, exist_ok=True)
    clip_path = str(save_full_size_clip(workdir / "clip-vit-large-patch14-336-random"))
    image = str(test_image(workdir / "part.png"))
    print("| precision | methods | backbone weights (MB) | target (MB) | serving peak RSS (MB) | / target | "
          "loading peak RSS (MB) | / target |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in ("float32", "bfloat16"):
        result = subprocess.run(
            [sys.executable, __file__, "--child", clip_path, image, precision], capture_output=True, text=True, check=True
        )
        row = json.loads(result.stdout.strip().splitlines()[-1])
        target = 1.15 * row["weight_bytes"] + 400 * MB
        print(
            f"| {precision} | {len(row['methods'])} | {row['weight_bytes'] / MB:.0f} | {target / MB:.0f} | "
            f"{row['serving_peak'] / MB:.0f} | {row['serving_peak'] / target:.2f} | "
            f"{row['load_peak'] / MB:.0f} | {row['load_peak'] / target:.2f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(*sys.argv[2:5])))
    else:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
        main(Path(parser.parse_args().workdir))
