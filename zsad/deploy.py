"""Run a graph written by ``zsad export`` with numpy, Pillow and ONNX Runtime or OpenVINO: no torch.

```python
>>> from zsad.deploy import ExportedDetector
>>> detector = ExportedDetector.load("exported/")            # zsad_deploy.json + model.onnx / model.xml
>>> result = detector.detect("part.png", "metal nut")
>>> result.score, result.verdict, result.anomaly_map.shape   # (H, W) of part.png
```

Install the runtimes with ``pip install -e '.[deploy]'`` in a zsad checkout (or ``pip install -r requirements-deploy.txt``).
"""

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ZSADError
from .images import load_image, normalised_pixels

CONFIG_NAME = "zsad_deploy.json"
FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "int8")
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
# Which runtime runs which graph file: OpenVINO reads ONNX graphs too.
ENGINES = {"onnx": ("onnx",), "openvino": ("onnx", "openvino")}
EXTRA_HINT = "pip install -e '.[deploy]' in a zsad checkout (or pip install -r requirements-deploy.txt)"


def require_extra(*modules: str) -> None:
    """Raise a ZSADError naming the ``deploy`` extra unless every module can be imported."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ZSADError(f"Exporting and running exported models needs {', '.join(missing)}; install them with {EXTRA_HINT}.")


@dataclass
class ExportedDetection:
    """One image's result: ``anomaly_map`` (H, W) float32 in [0, 1] at the image's own size; ``model_map`` at the
    graph's input size."""

    class_name: str
    score: float
    threshold: float
    anomaly_map: np.ndarray
    model_map: np.ndarray
    seconds: float
    pixel_threshold: float | None = None  # the mask's threshold where it differs from the verdict's (a calibrated profile)

    @property
    def is_anomalous(self) -> bool:
        return self.score >= self.threshold

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the anomaly map at or above the pixel threshold."""
        return self.anomaly_map >= (self.threshold if self.pixel_threshold is None else self.pixel_threshold)

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) map -> (H, W) float32 map for an image of PIL ``size`` (W, H), bilinear, clipped to [0, 1]."""
    resized = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


class ExportedDetector:
    """An exported graph with its pre-processing, names and thresholds."""

    def __init__(self, config: dict, run_graph, engine: str):
        self.config = config
        self.engine = engine
        self._run_graph = run_graph

    @classmethod
    def load(cls, directory: str | Path, engine: str | None = None, threads: int | None = None, **engine_options) -> "ExportedDetector":
        """``engine`` is "onnx" (ONNX Runtime) or "openvino" (options: ``inference_precision``); default: the one
        the graph was exported for."""
        config = read_config(directory)
        engine = engine or config["format"]
        if engine not in ENGINES or config["format"] not in ENGINES[engine]:
            raise ZSADError(
                f"A {config['format']} graph runs with the engines {[name for name, formats in ENGINES.items() if config['format'] in formats]}, "
                f"not '{engine}'."
            )
        graph = Path(directory) / config["graph"]
        runner = onnxruntime_runner if engine == "onnx" else openvino_runner
        return cls(config, runner(graph, threads, **engine_options), engine)

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"]

    @property
    def method(self) -> str:
        return self.config["method"]

    def threshold(self, class_name: str) -> float:
        """The verdict's threshold stored for ``class_name`` (a profile's calibrated one, or --threshold)."""
        return float(self.config["thresholds"][class_name]["image"])

    def pixel_threshold(self, class_name: str) -> float:
        """The mask's threshold stored for ``class_name``."""
        entry = self.config["thresholds"][class_name]
        return float(entry.get("pixel", entry["image"]))

    def pixel_values(self, images: list[Image.Image]) -> np.ndarray:
        config = self.config
        return np.ascontiguousarray(normalised_pixels(images, config["image_size"], config["image_mean"], config["image_std"]))

    def scores_and_maps(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw graph outputs for one (1, 3, S, S) image: scores (1, C) and maps (1, C, S, S), one column per name."""
        return self._run_graph(pixel_values)

    def detect(self, image, class_name: str | None = None, threshold: float | None = None) -> ExportedDetection:
        """Score one image (path, bytes, PIL image or array) for one of the exported names (default: the only one)."""
        started = time.perf_counter()
        column = self._column(class_name)
        name = self.class_names[column]
        pixel_threshold = self.pixel_threshold(name) if threshold is None else float(threshold)
        threshold = self.threshold(name) if threshold is None else float(threshold)
        picture = load_image(image)
        scores, maps = self.scores_and_maps(self.pixel_values([picture]))
        model_map = np.clip(maps[0, column], 0.0, 1.0)
        return ExportedDetection(
            class_name=name,
            score=float(scores[0, column]),
            threshold=threshold,
            anomaly_map=resize_map(model_map, picture.size),
            model_map=model_map,
            seconds=time.perf_counter() - started,
            pixel_threshold=None if pixel_threshold == threshold else pixel_threshold,
        )

    def resolve_class_name(self, class_name: str | None) -> str:
        """``class_name`` as the graph names it, or the only exported name when None."""
        return self.class_names[self._column(class_name)]

    def _column(self, class_name: str | None) -> int:
        names = self.class_names
        if class_name is None:
            if len(names) != 1:
                raise ZSADError(f"Say which product this is; the graph was exported for {names}.")
            return 0
        cleaned = " ".join(class_name.replace("_", " ").split())
        if cleaned not in names:
            raise ZSADError(f"The graph was exported for {names}, not '{class_name}'; export again with that --class-name.")
        return names.index(cleaned)


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ZSADError(f"{directory} is not an exported model: it has no {CONFIG_NAME}. Write one with `zsad export`.")
    return json.loads(path.read_text())


def _threads(threads: int | None) -> int:
    return threads or len(os.sched_getaffinity(0))


def onnxruntime_runner(graph: Path, threads: int | None = None):
    require_extra("onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = _threads(threads)
    session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(pixel_values: np.ndarray):
        scores, maps = session.run(["image_score", "anomaly_map"], {input_name: pixel_values})
        return scores, maps

    return run


def openvino_runner(graph: Path, threads: int | None = None, inference_precision: str = "f32"):
    """OpenVINO on the CPU. Its own default runs float graphs in bf16 on CPUs with native bf16, which costs the
    fp32 parity; ``inference_precision="bf16"`` asks for that explicitly."""
    require_extra("openvino")
    import openvino as ov

    properties = {"INFERENCE_NUM_THREADS": _threads(threads), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": inference_precision}
    compiled = ov.Core().compile_model(str(graph), "CPU", properties)
    request = compiled.create_infer_request()

    def run(pixel_values: np.ndarray):
        outputs = request.infer({0: pixel_values})
        return outputs[compiled.output("image_score")], outputs[compiled.output("anomaly_map")]

    return run
