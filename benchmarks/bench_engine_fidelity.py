"""How far each vision route's maps and scores are from torch float32, per method, on the tiny random CLIP.

The fidelity half of docs/PERFORMANCE.md's bounds per route (``benchmarks/bench_engine.py`` gives the full-size
figures for the baseline and ``auto``): every method the detector holds, three 90x120 pixel-noise images (seeds 5, 6,
7, the images tests/test_engine.py uses), and for each route the lowest map Pearson and the largest |image-score
difference| against the float32 detector on torch.

    python benchmarks/bench_engine_fidelity.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cpu_class_line  # noqa: E402
from zsad import AnomalyDetector  # noqa: E402
from zsad.runtime.engine import OpenVINOEngine, TorchEngine  # noqa: E402
from zsad.runtime.tiny_clip import save_tiny_clip  # noqa: E402

IMAGE_SIZE = 112  # the tiny CLIP's test size (tests/conftest.py)
ROUTES = [("torch", "int8"), ("torch", "bfloat16"), ("openvino", "float32"), ("openvino", "bfloat16"),
          ("openvino-int8", "float32"), ("openvino-int8", "bfloat16"),
          ("openvino-w8a8", "float32"), ("openvino-w8a8", "bfloat16"), ("openvino-w8a8", "int8")]


def detector(clip_path: str, engine: str, precision: str, cache: str) -> AnomalyDetector:
    loaded = AnomalyDetector.load(clip=clip_path, precision=precision, image_size=IMAGE_SIZE, device="cpu", engine="torch")
    route = TorchEngine(loaded.backbone) if engine == "torch" else OpenVINOEngine(loaded.backbone, cache, engine)
    return AnomalyDetector(loaded.backbone, {name: loaded.model(name) for name in loaded.method_names}, engine=route)


def main() -> None:
    print(cpu_class_line())
    images = [(np.random.default_rng(seed).random((90, 120, 3)) * 255).astype(np.uint8) for seed in (5, 6, 7)]
    with tempfile.TemporaryDirectory() as workdir:
        clip_path = str(save_tiny_clip(Path(workdir) / "clip"))
        exact = detector(clip_path, "torch", "float32", workdir)
        references = {(method, index): exact.detect(image, "metal nut", method=method)
                      for method in exact.method_names for index, image in enumerate(images)}
        print("| route | " + " | ".join(exact.method_names) + " |\n|---|" + "---:|" * len(exact.method_names))
        for engine, precision in ROUTES:
            candidate = detector(clip_path, engine, precision, workdir)
            cells = []
            for method in exact.method_names:
                results = [(references[method, index], candidate.detect(image, "metal nut", method=method))
                           for index, image in enumerate(images)]
                pearson = min(np.corrcoef(a.anomaly_map.ravel(), b.anomaly_map.ravel())[0, 1] for a, b in results)
                difference = max(abs(a.score - b.score) for a, b in results)
                cells.append(f"{pearson:.5f} / {difference:.4f}")
            print(f"| {engine} {precision} | " + " | ".join(cells) + " |", flush=True)
    print("\neach cell: the lowest map Pearson / the largest image-score difference over the three images, against torch float32")


if __name__ == "__main__":
    main()
