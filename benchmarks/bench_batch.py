"""The Space's Batch tab against its single-image requests: memory above the loaded detector and seconds per image,
for chunk sizes (images per forward pass).

For each chunk size a fresh process with the Space's malloc settings (``zsad.allocator``) loads StackCLIP on a bf16
full-size CLIP ViT-L/14@336 (random weights), answers one single-image request (the serving peak the memory target
is sized for), then runs the batch handler of zsad/space/handlers.py on IMAGES copies of a 900x700 image.

    python benchmarks/bench_batch.py [--chunks 1 2 4] [--images 8] [--workdir /tmp/zsad-bench]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Run in the child, so that each chunk size starts from the same allocator state.
MEASURE = """
import json, os, sys, time
import torch
import zsad.space.handlers as handlers
from benchmarks.common import proc_status_mb as status_mb
from zsad.allocator import return_large_buffers_to_the_system
from zsad.inference import AnomalyDetector
from zsad.space.files import OutputFolders
from zsad.space.testing import upload

return_large_buffers_to_the_system()
clip, image, chunk, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
detector = AnomalyDetector.load(methods=["stackclip"], clip=clip, precision="bfloat16", image_size=518)
detector.detect(image, "metal nut", method="stackclip")  # text features cached, first-call allocations made
loaded = status_mb("VmRSS")
open(f"/proc/{os.getpid()}/clear_refs", "w").write("5")
started = time.perf_counter()
detector.detect(image, "metal nut", method="stackclip")
single_seconds, single_peak = time.perf_counter() - started, status_mb("VmHWM")
handlers.BATCH_CHUNK = chunk
folders = OutputFolders()
handler = handlers.make_batch_handler(detector, folders)
open(f"/proc/{os.getpid()}/clear_refs", "w").write("5")
started = time.perf_counter()
table = handler([upload(image) for _ in range(count)], "metal nut", "stackclip", 0.5).table
batch_seconds, batch_peak = time.perf_counter() - started, status_mb("VmHWM")
assert len(table) == count
print(json.dumps({"loaded": loaded, "single_peak": single_peak, "single_seconds": single_seconds,
                  "batch_peak": batch_peak, "batch_seconds": batch_seconds}))
"""


def measure(clip_path: str, image: str, chunk: int, images: int) -> dict:
    environment = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", MEASURE, clip_path, image, str(chunk), str(images)], env=environment,
                            capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(result.stdout.splitlines()[-1])


def main(workdir: Path, chunks: list[int], images: int) -> None:
    import torch

    from benchmarks.common import full_size_inputs, machine_line
    from zsad.loading import resolve_precision

    clip_path, image = full_size_inputs(workdir)
    native_bf16 = resolve_precision("auto") == torch.bfloat16
    print(f"{machine_line()}; CPU class: {'native bf16 (AVX512-BF16/AMX or GPU)' if native_bf16 else 'no native bf16'}")
    print(f"| images per forward pass | single request: peak above loaded (MB) / seconds | batch of {images}: peak above "
          "loaded (MB) | batch: seconds per image |")
    print("|---|---|---|---|")
    for chunk in chunks:
        figures = measure(clip_path, image, chunk, images)
        print(f"| {chunk} | +{figures['single_peak'] - figures['loaded']:.0f} / {figures['single_seconds']:.2f} | "
              f"+{figures['batch_peak'] - figures['loaded']:.0f} | {figures['batch_seconds'] / images:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=8)
    arguments = parser.parse_args()
    main(Path(arguments.workdir), arguments.chunks, arguments.images)
