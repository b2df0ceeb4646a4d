"""Camera-size images through the Space: a 12-megapixel JPEG against a 900x700 PNG, end to end over HTTP.

The real app (``python app.py``) is started on a free port and driven by ``gradio_client`` as a visitor's browser
would be: upload, detection, and every output the page receives (before/after pair, mask, score, report, table).
The ratio of the two median request times is the figure (target <= 1.5). With ``--tiles`` it also times the Space's
tiled option on both images.

    python benchmarks/bench_camera.py [--repeats 5] [--clip PATH | --full-size] [--tiles] [--workdir /tmp/zsad-bench]

Default model: the tiny random CLIP (``--tiny``), which leaves decoding and post-processing as nearly all the work;
``--full-size`` runs the full-size CLIP ViT-L/14@336 architecture with random weights.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cpu_class, full_size_inputs, machine_line, photo_like_image, run_times  # noqa: E402
from zsad.detection.detector import tile_boxes  # noqa: E402
from zsad.space.testing import serving_app  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLASS_NAME = "metal nut"
CAMERA_SIZE = (4000, 3000)  # 12 MP


def camera_jpeg(path: Path) -> Path:
    """A 12 MP photo-like JPEG (gradient, texture and noise; quality 90, as cameras write)."""
    width, height = CAMERA_SIZE
    rng = np.random.default_rng(1)
    texture = rng.normal(0.0, 12.0, size=(height // 4, width // 4, 3))
    texture = np.asarray(Image.fromarray(np.clip(texture + 128, 0, 255).astype(np.uint8)).resize((width, height)), dtype=np.float32) - 128
    gradient = np.linspace(50, 200, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(gradient + texture + rng.normal(0.0, 4.0, size=(height, width, 1)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def request_seconds(client: Client, image: Path, repeats: int, tiles: bool = False) -> list[float]:
    """Wall time of each request (after one warm-up request), outputs downloaded as the page would."""
    # /detect takes (image, class name, method, threshold, reference images, tiles); no references here.
    return run_times(lambda: client.predict(handle_file(str(image)), CLASS_NAME, "baseline", 0.5, None, tiles, api_name="/detect"), repeats)


def main(workdir: Path, repeats: int, clip: str | None, full_size: bool, tiles: bool) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    small = photo_like_image(workdir / "part.png")
    camera = workdir / "camera-12mp.jpg"
    if not camera.exists():
        camera_jpeg(camera)
    if full_size:
        clip = full_size_inputs(workdir)[0]
    arguments = ["--clip", clip] if clip else ["--tiny"]
    print(machine_line())
    print(cpu_class())
    print(f"model: {'full-size random CLIP ViT-L/14@336' if full_size else clip or 'tiny random CLIP (--tiny)'}; method baseline; "
          f"{repeats} timed requests each after one warm-up; {camera.stat().st_size / 1e6:.1f} MB JPEG vs {small.stat().st_size / 1e6:.1f} MB PNG")
    with serving_app(REPO / "app.py", *arguments, log=workdir / "bench_camera_app.log", timeout=900) as (url, _):
        client = Client(url, verbose=False)
        rows = [("900x700 PNG", small, False), ("4000x3000 JPEG (12 MP)", camera, False)]
        if tiles:  # one request each; the 12 MP image's 80 windows only with a small model
            rows += [("900x700 PNG, tiles", small, True)] + ([] if full_size else [("4000x3000 JPEG, tiles", camera, True)])
        medians = {}
        print("\n| image | median s | min s | max s |\n|---|---|---|---|")
        for label, path, tiled in rows:
            times = request_seconds(client, path, 1 if tiled else repeats, tiled)
            medians[label] = statistics.median(times)
            print(f"| {label} | {medians[label]:.2f} | {min(times):.2f} | {max(times):.2f} |")
    ratio = medians["4000x3000 JPEG (12 MP)"] / medians["900x700 PNG"]
    print(f"\n12 MP / 900x700 end to end through the Space: {ratio:.2f}x (target <= 1.5x)")
    for label, windows in (("900x700 PNG", len(tile_boxes((900, 700), 518))), ("4000x3000 JPEG", len(tile_boxes(CAMERA_SIZE, 518)))):
        if f"{label}, tiles" in medians:
            print(f"tiles, {label}: {windows} windows, {medians[f'{label}, tiles']:.2f} s "
                  f"({medians[f'{label}, tiles'] / medians[label.replace(' JPEG', ' JPEG (12 MP)')]:.1f}x the untiled request)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clip", help="a CLIP folder for the app (default: the tiny random CLIP)")
    parser.add_argument("--full-size", action="store_true", help="the full-size random CLIP ViT-L/14@336")
    parser.add_argument("--tiles", action="store_true", help="also time the Space's tiled option (one request per image)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    args = parser.parse_args()
    main(Path(args.workdir), args.repeats, args.clip, args.full_size, args.tiles)
