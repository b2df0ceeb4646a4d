"""Peak memory of the Space's process for the largest inputs its caps let through: a batch at the pixel cap
(25 images of 6000x4000, 600 megapixels) and 16 reference images of 7000x7000 (784 megapixels), above the process's
memory after one small request. The same run measures the Space as it was before its pixel budgets (the tree at
git revision ``--before``: its ``app.py`` on its own zsad) with the same inputs, for the ratio.

The files are near-uniform PNGs, each with its own colour and a small random patch (distinct contents, a few KB
each: what a pixel bomb looks like). The tiny random CLIP serves (``--tiny``): the backbone's own memory does not
depend on the inputs' size, the decoding and the full-resolution outputs do.

    python benchmarks/bench_space_memory.py [--before 9e0cb88] [--workdir /tmp/zsad-bench-space] [--images N]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_class, machine_line, proc_status_mb  # noqa: E402
from zsad.space.testing import serving_app  # noqa: E402

BATCH = (25, (6000, 4000))
REFERENCES = (16, (7000, 7000))


def near_uniform_pngs(folder: Path, count: int, size: tuple[int, int], prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(prefix))
    paths = []
    for index in range(count):
        path = folder / f"{prefix}{index:02d}.png"
        if not path.exists():
            image = Image.new("RGB", size, (90 + 5 * index, 120, 140))
            image.paste(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), (64 * index, 64))
            image.save(path, compress_level=9)
        paths.append(path)
    return paths


def peak_above(pid: int, baseline_mb: float, call) -> float:
    """The process's peak RSS during ``call`` above ``baseline_mb`` (the kernel's high-water mark, reset first)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    call()
    return proc_status_mb("VmHWM", pid) - baseline_mb


def measure(app: Path, small: Path, references: list[Path], batch: list[Path], log: Path) -> dict[str, float]:
    with serving_app(app, "--tiny", log=log, timeout=600) as (url, process):
        client = Client(url, verbose=False)
        client.predict(handle_file(str(small)), "screw", "baseline", 0.5, api_name="/detect")
        baseline = proc_status_mb("VmRSS", process.pid)
        files = [handle_file(str(path)) for path in references]
        with_references = peak_above(process.pid, baseline, lambda: client.predict(
            handle_file(str(small)), "screw", "baseline", 0.5, files, api_name="/detect"))
        uploads = [handle_file(str(path)) for path in batch]
        batch_peak = peak_above(process.pid, baseline, lambda: client.predict(uploads, "screw", "baseline", 0.5, api_name="/detect_batch"))
    return {"loaded": baseline, "references": with_references, "batch": batch_peak}


def main(workdir: Path, before: str, images: int | None = None) -> None:
    """``images`` (default: the caps' 25 and 16) shrinks both sets for a quick check that the script still runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    small = workdir / "small.png"
    Image.new("RGB", (320, 240), (100, 110, 120)).save(small)
    references = near_uniform_pngs(workdir / "references", images or REFERENCES[0], REFERENCES[1], "good")
    batch = near_uniform_pngs(workdir / "batch", images or BATCH[0], BATCH[1], "part")
    old = checked_out(before, workdir / "before") / "app.py"
    print(machine_line())
    print(cpu_class())
    print(f"tiny random CLIP (--tiny); batch: {BATCH[0]} PNGs of {BATCH[1][0]}x{BATCH[1][1]} "
          f"({sum(path.stat().st_size for path in batch) / 1e6:.1f} MB); references: {REFERENCES[0]} PNGs of "
          f"{REFERENCES[1][0]}x{REFERENCES[1][1]} ({sum(path.stat().st_size for path in references) / 1e6:.1f} MB)")
    results = {"before": measure(old, small, references, batch, workdir / "before.log"),
               "now": measure(REPO / "app.py", small, references, batch, workdir / "now.log")}
    print("\n| Space | RSS after one request (MB) | peak above it: 16 references 7000x7000 (MB) | peak above it: batch at the cap (MB) |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['loaded']:.0f} | {row['references']:.0f} | {row['batch']:.0f} |")
    for key in ("references", "batch"):
        print(f"{key}: now / before = {results['now'][key] / results['before'][key]:.2f}x")


def checked_out(revision: str, folder: Path) -> Path:
    """The repository's tree at ``revision`` in ``folder`` (its app.py imports its own zsad, beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="9e0cb88", help="git revision of the Space before its pixel budgets")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench-space"))
    parser.add_argument("--images", type=int, help="images per set (default: the caps, 25 and 16)")
    args = parser.parse_args()
    main(Path(args.workdir), args.before, args.images)
