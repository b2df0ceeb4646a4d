"""Peak memory of a detector holding every method on one shared full-size CLIP ViT-L/14@336 (random weights) at
518 px, per precision: each precision loads in a fresh process; the table gives the peak RSS (VmHWM) until the
detector is loaded and over one detection per method plus one ``compare`` (the peak is reset in between through
/proc/self/clear_refs), against float32 measured in the same run.

    python benchmarks/bench_memory.py [--workdir /tmp/zsad-bench] [--precisions float32 int8 bfloat16] [--load-only]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_class_line, full_size_inputs  # noqa: E402

CLASS_NAME = "metal nut"
MEASURE = """
import json, sys
from pathlib import Path
from benchmarks.common import proc_status_mb
from zsad import AnomalyDetector
from zsad.runtime.loading import Runtime

clip, image, precision, serve = sys.argv[1:5]
detector = AnomalyDetector.load(clip=clip, image_size=518, runtime=Runtime.resolve("cpu", precision))
loaded = proc_status_mb("VmHWM")
Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
for method in detector.method_names if serve == "serve" else ():
    detector.detect(image, CLASS_NAME, method=method)
if serve == "serve":
    detector.compare(image, CLASS_NAME)
print(json.dumps({"load_peak": loaded, "serving_peak": proc_status_mb("VmHWM") if serve == "serve" else None}))
""".replace("CLASS_NAME", repr(CLASS_NAME))


def measure(clip_path: str, image: str, precision: str, serve: bool) -> dict:
    completed = subprocess.run([sys.executable, "-c", MEASURE, clip_path, image, precision, "serve" if serve else "load"],
                               capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(workdir: Path, precisions: list[str], serve: bool) -> None:
    clip_path, image = full_size_inputs(workdir)
    print(cpu_class_line())
    print("| precision | peak RSS until loaded (MB) | x float32 | peak RSS while serving (MB) | x float32 |")
    print("|---|---|---|---|---|")
    baseline = None
    for precision in precisions:
        peaks = measure(clip_path, image, precision, serve)
        baseline = baseline or peaks
        serving = (f"{peaks['serving_peak']:.0f} | {peaks['serving_peak'] / baseline['serving_peak']:.2f}" if serve else "not measured | -")
        print(f"| {precision} | {peaks['load_peak']:.0f} | {peaks['load_peak'] / baseline['load_peak']:.2f} | {serving} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    parser.add_argument("--precisions", nargs="+", default=["float32", "int8"], help="the first is the baseline (default float32 int8)")
    parser.add_argument("--load-only", action="store_true", help="measure loading only (no detections; minutes less)")
    arguments = parser.parse_args()
    main(Path(arguments.workdir), arguments.precisions, serve=not arguments.load_only)
