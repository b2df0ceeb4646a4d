"""Run a graph written by ``zsad export`` with numpy, Pillow and ONNX Runtime or OpenVINO: no torch.

```python
>>> from zsad.deploy.runtime import ExportedDetector
>>> detector = ExportedDetector.load("exported/")            # zsad_deploy.json + model.onnx / model.xml
>>> result = detector.detect("part.png", "metal nut")
>>> result.score, result.verdict, result.anomaly_map.shape   # (H, W) of part.png
```

Install the runtimes with ``pip install -e '.[deploy]'`` in a checkout of zsad (or ``requirements-deploy.txt``).
"""

import importlib.util
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from ..detection.results import Detection, build_detection, thresholds
from ..modeling.class_names import clean_class_name
from ..modeling.exceptions import ZSADError
from ..modeling.image_processing_zsad import PROCESSOR_FILE, ZSADImageProcessor
from ..runtime.images import load_image

CONFIG_NAME = "zsad_deploy.json"
FORMATS = ("onnx", "openvino")
PRECISIONS = ("float32", "int8")  # the names zsad.runtime.loading uses for the same precisions
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
# Which runtime runs which graph file: OpenVINO reads ONNX graphs too.
ENGINES = {"onnx": ("onnx",), "openvino": ("onnx", "openvino")}
# Graphs exported before zsad recorded provenance: their thresholds give verdicts, as they did then.
UNRECORDED_STATUS = "exported (status not recorded)"
EXTRA_HINT = "pip install -e '.[deploy]' in a checkout of zsad (or pip install -r requirements-deploy.txt)"


def require_extra(*modules: str) -> None:
    """Raise a ZSADError naming the ``deploy`` extra unless every module can be imported."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ZSADError(f"Exporting and running exported models needs {', '.join(missing)}; install them with {EXTRA_HINT}.")


class ExportedDetector:
    """An exported graph with its pre-processing, names and thresholds."""

    def __init__(self, config: dict, run_graph, engine: str, processor: ZSADImageProcessor):
        self.config = config
        self.engine = engine
        self.processor = processor
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
        return cls(config, runner(graph, threads, **engine_options), engine, read_processor(directory, config))

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def status(self) -> str:
        """The exported method's status as ``zsad export`` recorded it ("trained", "untrained", "training-free"), which
        decides as for a loaded model whether the graph's default threshold gives a verdict (``gives_verdict``)."""
        return self.config.get("provenance", {}).get("status", UNRECORDED_STATUS)

    def pixel_values(self, images: list[Image.Image]) -> np.ndarray:
        return np.ascontiguousarray(self.processor.preprocess(images))

    def scores_and_maps(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw graph outputs for one (1, 3, S, S) image: scores (1, C) and maps (1, C, S, S), one column per name."""
        return self._run_graph(pixel_values)

    def verdict_thresholds(self, class_name: str | None, threshold: float | None = None) -> tuple[float, float, str]:
        """(image threshold, pixel threshold, where they come from) for ``class_name``: ``threshold`` for both, else the
        ones stored with the graph (a profile's calibrated ones, or those given to ``zsad export``)."""
        if threshold is not None:
            return thresholds(threshold)
        entry = self.config["thresholds"][self.resolve_class_name(class_name)]
        return float(entry["image"]), float(entry.get("pixel", entry["image"])), entry.get("source", "")

    def detect(self, image, class_name: str | None = None, threshold: float | None = None) -> Detection:
        """Score one image (path, bytes, PIL image or array) for one of the exported names (default: the only one)."""
        started = time.perf_counter()
        column = self._column(class_name)
        name = self.class_names[column]
        picture = load_image(image)
        scores, maps = self.scores_and_maps(self.pixel_values([picture]))
        references = self.config.get("references") or {}
        return build_detection(
            method=self.method, status=self.status, class_name=name, score=float(scores[0, column]), picture=picture,
            thresholds=self.verdict_thresholds(name, threshold), model_map=np.clip(maps[0, column], 0.0, 1.0),
            seconds=time.perf_counter() - started, original_size=picture.size,
            references=references.get("num_references", 0) if references.get("class_name") == name else 0,
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
        cleaned = clean_class_name(class_name)
        if cleaned not in names:
            raise ZSADError(f"The graph was exported for {names}, not '{class_name}'; export again with that --class-name.")
        return names.index(cleaned)


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ZSADError(f"{directory} is not an exported model: it has no {CONFIG_NAME}. Write one with `zsad export`.")
    return json.loads(path.read_text())


def read_processor(directory: str | Path, config: dict) -> ZSADImageProcessor:
    """The graph's image processor: its ``preprocessor_config.json``, or for exports of format version 1 the
    settings in ``zsad_deploy.json``."""
    if (Path(directory) / PROCESSOR_FILE).is_file():
        return ZSADImageProcessor.from_pretrained(directory)
    return ZSADImageProcessor(config["image_size"], config["image_mean"], config["image_std"], config.get("resize", "bicubic"))


class ExportedGraphPredictor:
    """An exported graph behind the interface ``zsad.cli.predict.predict_files`` uses (``zsad predict --engine``)."""

    def __init__(self, detector: ExportedDetector):
        self.detector = detector

    @classmethod
    def load(cls, directory: str | Path, engine: str) -> "ExportedGraphPredictor":
        return cls(ExportedDetector.load(directory, engine=engine))

    @property
    def method_names(self) -> list[str]:
        return [self.detector.method]

    def status(self, method: str) -> str:
        return self.detector.status

    def verdict_thresholds(self, class_name: str, threshold: float | None = None, profile=None) -> tuple[float, float, str]:
        """The graph's ``verdict_thresholds`` (``profile`` must be None, as in ``detect_batch``)."""
        return self.detector.verdict_thresholds(class_name, threshold)

    def provenance(self, method: str, class_name_given: str | None, class_name_used: str,
                   threshold_rule: tuple[float, float, str]) -> dict:
        """The provenance block ``zsad export`` stored with the graph, for this run's product name and thresholds
        (``zsad.runtime.provenance.provenance``'s keys), naming the engine that ran it."""
        image, pixel, rule = threshold_rule
        return {**self.detector.config.get("provenance", {}), "engine": self.detector.engine,
                "product": {"given": class_name_given, "used": class_name_used},
                "threshold_rule": {"rule": rule, "image": image, "pixel": pixel}}

    def detect_batch(self, images, class_names, method=None, threshold: float | None = None, profile=None,
                     display_side: int | None = None) -> list[Detection]:
        """``profile`` must be None: an exported graph carries its own reference images and thresholds;
        ``display_side`` bounds are applied when the images are read (``zsad.cli.predict``)."""
        names = class_names if isinstance(class_names, (list, tuple)) else [class_names] * len(images)
        return [self.detector.detect(image, name, threshold) for image, name in zip(images, names)]


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


class OneProcess:
    """What ``zsad.cli.predict.predict_files`` asks of Accelerate's ``PartialState``, for one process and no torch."""

    is_main_process = is_local_main_process = True
    process_index = 0

    def wait_for_everyone(self) -> None:
        pass

    @contextmanager
    def split_between_processes(self, items):
        yield items
