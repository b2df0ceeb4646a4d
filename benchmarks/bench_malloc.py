"""glibc malloc settings against the detector's serving peak and latency (why zsad.allocator sets what it sets).

For each setting a fresh process (GLIBC_TUNABLES set before it starts) loads every method on one bf16
full-size CLIP ViT-L/14@336 (random weights), runs each method once plus "compare" on a 900x700 image, and
reports its peak RSS above the RSS after loading, the loading peak, and the fastest of three requests per method.

    python benchmarks/bench_malloc.py [--workdir /tmp/zsad-bench]
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

from zsad.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD  # noqa: E402

MIB = 2**20
SETTINGS = {
    "glibc defaults": "",
    "mmap threshold 1 MiB": f"glibc.malloc.mmap_threshold={MIB}",
    "mmap threshold 4 MiB": f"glibc.malloc.mmap_threshold={4 * MIB}",
    f"mmap threshold {MMAP_THRESHOLD // MIB} MiB, trim threshold {TRIM_THRESHOLD // MIB} MiB (zsad.allocator)":
        f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}",
}
# Run in the child: GLIBC_TUNABLES applies from the first allocation, like zsad.allocator in a starting Space.
MEASURE = """
import json, os, sys, time
import torch
from benchmarks.common import proc_status_mb as status_mb
from zsad.inference import AnomalyDetector

detector = AnomalyDetector.load(clip=sys.argv[1], precision="bfloat16", image_size=518)
loaded, loading_peak = status_mb("VmRSS"), status_mb("VmHWM")
open(f"/proc/{os.getpid()}/clear_refs", "w").write("5")
for method in detector.method_names:
    detector.detect(sys.argv[2], "metal nut", method=method)
detector.compare(sys.argv[2], "metal nut")
seconds = {}
for method in detector.method_names:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        detector.detect(sys.argv[2], "metal nut", method=method)
        times.append(time.perf_counter() - started)
    seconds[method] = min(times)
print(json.dumps({"loading_peak": loading_peak, "loaded": loaded, "serving_peak": status_mb("VmHWM"), "seconds": seconds}))
"""


def measure(tunables: str, clip_path: str, image: str) -> dict:
    environment = {**os.environ, "GLIBC_TUNABLES": tunables, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", MEASURE, clip_path, image], env=environment, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main(workdir: Path) -> None:
    from benchmarks.common import full_size_inputs

    clip_path, image = full_size_inputs(workdir)
    print("| malloc setting | loading peak (MB) | serving peak above loaded (MB) | seconds per image: "
          "baseline / StackCLIP / GenCLIP |")
    print("|---|---|---|---|")
    for label, tunables in SETTINGS.items():
        figures = measure(tunables, clip_path, image)
        seconds = " / ".join(f"{figures['seconds'][m]:.2f}" for m in ("baseline", "stackclip", "genclip"))
        print(f"| {label} | {figures['loading_peak']:.0f} | +{figures['serving_peak'] - figures['loaded']:.0f} | {seconds} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    main(Path(parser.parse_args().workdir))
