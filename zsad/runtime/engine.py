"""Where the vision pass runs: torch, or an OpenVINO graph of it built once and kept in a cache folder on disk.

The vision pass (``CLIPBackbone.encode_image_streams``: the tapped layers of each stream, the class token, the global
embedding) does not depend on the product name, so one graph per backbone, input size, streams and precision serves
every name; the positional embeddings are an input of the graph (computed in torch for the pass's interpolation), and
a graph whose streams hold more layers at the same cost (same value-value starts, last block run the same way)
serves a pass that needs fewer, so AnomalyCLIP's bilinear pass runs on the other methods' graph. The text heads,
references, mutual scoring and post-processing stay in torch. ``zsad.runtime.engine_choice`` picks between the
engines by measuring them.

```python
>>> engine = OpenVINOEngine(backbone)            # the graph is built (or read from the cache) on first use
>>> streams = engine.encode_streams(pixel_values, {None: [6, 12], 6: [18, 24]}, "bicubic")
>>> streams = engine.encode_streams(pixel_values, {6: [24]}, "bilinear")   # the same graph, other positions
```

The cache lives in ``$ZSAD_ENGINE_CACHE``, else ``$HF_HOME/zsad/engines`` (``engine_cache_dir``): one folder per
``graph_fingerprint``, holding the graph and a manifest with each file's SHA-256. A folder is built in a temporary
folder beside it, synced and renamed into place under a file lock, so concurrent builders leave one whole folder; a
folder whose manifest, files or hashes do not check out is rebuilt, never used.
"""

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from ..modeling.clip_backbone import CLIPBackbone, ImageFeatures, stock_taps
from ..modeling.exceptions import ZSADError
from .atomic import fsync
from .noise import logger_level
from .provenance import vision_precision, zsad_version

CACHE_FORMAT = 3
GRAPH_FILES = ("vision.xml", "vision.bin")
MANIFEST = "manifest.json"
# OpenVINO's CPU plug-in computes in bfloat16 by default where the CPU has it; float32 asks for float32 explicitly.
# An int8 backbone (torch's dynamic int8 linears) runs on OpenVINO only with int8 activations too (openvino-w8a8),
# computing the rest in float32: its linears' int8 weights are dequantised for the export and quantised again per
# channel. With int8 weights alone it would compute in float32, slower than torch int8 (3.21 s against
# 2.69 s on a Zen 4, docs/PERFORMANCE.md, deploy routes).
OPENVINO_PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}
# A bfloat16 graph keeps its weights as float16 on disk: half the file, and for ViT-L 1.45 GB resident per compiled
# graph instead of 2.0 (float16 holds every bfloat16 value's precision and CLIP's weights' range). A float32 graph
# keeps float32 weights.
WEIGHTS_IN_FLOAT16 = {"float32": False, "bfloat16": True, "int8": False}
# What each OpenVINO engine makes int8, by name. ``openvino-int8``: NNCF's weight compression, per output channel with
# a zero point; the graph still computes in the backbone's precision (OpenVINO expands the weights inside its matmul
# kernels). On the full-size ViT-L/14 with random weights, bfloat16: the tapped tokens within Pearson 0.99991 of torch
# float32 (0.99999 without int8 weights), 0.75x the stock bfloat16 forward's time (0.87x without); symmetric int8 was
# slower (0.79x) and no closer. ``openvino-w8a8``: NNCF's post-training quantisation (transformer preset, SmoothQuant),
# the linears' inputs as well as their weights int8 (``calibration_pixels`` sets the activations' ranges), the matrix
# products run in int8 (VNNI or AMX); the rest computes in the backbone's precision.
OPENVINO_INT8 = {"openvino": None, "openvino-int8": "weights", "openvino-w8a8": "weights and activations"}
INT8_WEIGHTS = "INT8_ASYM"
# Images the int8 activations' ranges are calibrated on: 8 took 100 s to quantise the full-size ViT-L/14 at 518 px on
# 2 cores; their ranges, not their number, matter (``calibration_pixels``).
CALIBRATION_IMAGES = 8
# The graph is exported at batch 2 with the batch left free (at batch 1 torch.export fixes it to 1).
EXAMPLE_BATCH = 2


def engine_cache_dir() -> Path:
    """``$ZSAD_ENGINE_CACHE``, else ``zsad/engines`` in the Hugging Face cache (``$HF_HOME``, default ~/.cache/huggingface)."""
    from huggingface_hub import constants

    return Path(os.environ.get("ZSAD_ENGINE_CACHE") or Path(os.environ.get("HF_HOME") or constants.HF_HOME) / "zsad" / "engines")


def stream_key(layers_by_start: dict) -> tuple:
    """A hashable, ordered form of {start: layers}: the graph's outputs follow this order."""
    return tuple(sorted(((start, tuple(layers)) for start, layers in layers_by_start.items()), key=lambda item: (item[0] is not None, item[0] or 0)))


def widest_first(passes: list, streams_of=lambda item: item[1]) -> list:
    """``passes`` with those tapping the most layers first (stable), so that a graph built for one of them can serve
    the narrower passes after it (``covers``)."""
    return sorted(passes, key=lambda item: -sum(len(layers) for layers in streams_of(item).values()))


class TorchEngine:
    """The vision pass as zsad has always run it: ``CLIPBackbone.encode_image_streams``."""

    name = "torch"

    def __init__(self, backbone: CLIPBackbone):
        self.backbone = backbone

    def encode_streams(self, pixel_values: torch.Tensor, layers_by_start: dict, position_interpolation: str) -> dict:
        with torch.inference_mode():
            return self.backbone.encode_image_streams(pixel_values.to(self.backbone.device), layers_by_start, position_interpolation)

    def describe(self) -> str:
        return f"torch {vision_precision(self.backbone)}"

    def route(self, size: int, layers_by_start: dict, position_interpolation: str) -> str:
        """What runs this pass, e.g. "torch bfloat16" (the provenance of its results)."""
        return self.describe()

    def prepare(self, size: int, layers_by_start: dict, position_interpolation: str) -> None:
        """Nothing to build for torch (``OpenVINOEngine.prepare`` builds or reads its graph)."""


def model_features(engine, model, pixel_values: torch.Tensor) -> ImageFeatures:
    """``model``'s features of one vision pass over ``pixel_values`` run by ``engine`` (its streams, then its selection)."""
    streams = engine.encode_streams(pixel_values, model.vision_streams(), model.config.position_interpolation)
    return model.features_from_streams(streams)


def model_route(engine, model) -> str:
    """The route ``engine`` runs ``model``'s vision pass on, e.g. "openvino bfloat16" (``auto`` decides it now)."""
    return engine.route(model.config.image_size, model.vision_streams(), model.config.position_interpolation)


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def openvino_unsupported(backbone: CLIPBackbone, name: str = "openvino") -> str | None:
    """Why the OpenVINO engine ``name`` (a key of ``OPENVINO_INT8``) cannot run this backbone (None: it can)."""
    if not openvino_available():
        return "OpenVINO is not installed (pip install openvino)"
    if OPENVINO_INT8[name] and importlib.util.find_spec("nncf") is None:
        return "NNCF, which makes the int8 graphs, is not installed (pip install nncf)"
    if backbone.device.type != "cpu":
        return f"OpenVINO runs on the CPU here, the backbone is on {backbone.device}"
    precision = vision_precision(backbone)
    runs = ("float32", "bfloat16", "int8") if name == "openvino-w8a8" else ("float32", "bfloat16")
    if precision not in runs:
        return f"the {name} engine runs {' or '.join(runs)} backbones, not {precision}"
    return None


class OpenVINOEngine:
    """The vision pass as an OpenVINO graph, one per (input size, streams), computing in the backbone's precision
    (float32 or bfloat16; an int8 backbone's in float32); ``name`` says what is int8 in it (``OPENVINO_INT8``).

    Thread-safe: each graph is compiled once (under a lock) and every call runs its own infer request."""


    def __init__(self, backbone: CLIPBackbone, cache_dir: str | Path | None = None, name: str = "openvino"):
        reason = openvino_unsupported(backbone, name)
        if reason:
            raise ZSADError(f"The {name} engine cannot run here: {reason}; use --engine torch or auto.")
        self.backbone = backbone
        self.name = name
        self.int8 = OPENVINO_INT8[name]
        self.precision = vision_precision(backbone)
        self.cache_dir = Path(cache_dir) if cache_dir else engine_cache_dir()
        self._weights = weights_identity(backbone)
        self._compiled: dict = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        computes = "float32" if self.precision == "int8" else self.precision
        return f"openvino {computes}" + (f", int8 {self.int8}" if self.int8 else "")

    def route(self, size: int, layers_by_start: dict, position_interpolation: str) -> str:
        return self.describe()

    def prepare(self, size: int, layers_by_start: dict, position_interpolation: str) -> None:
        """Build (or read from the cache) and compile this pass's graph now, before its first image."""
        self.compiled(size, layers_by_start)

    def fingerprint(self, size: int, layers_by_start: dict) -> str:
        return graph_fingerprint(self.graph_inputs(size, layers_by_start))

    def graph_inputs(self, size: int, layers_by_start: dict) -> dict:
        """Everything the graph depends on: what its cache folder's name is the hash of."""
        import openvino

        return {"cache_format": CACHE_FORMAT, "zsad": zsad_version(), "openvino": openvino.__version__, "torch": torch.__version__,
                "backbone": self._weights, "precision": self.precision, "int8": self.int8, "image_size": size,
                "streams": [[start, list(layers)] for start, layers in stream_key(layers_by_start)]}

    def encode_streams(self, pixel_values: torch.Tensor, layers_by_start: dict, position_interpolation: str) -> dict:
        self.backbone.check_streams(pixel_values, layers_by_start, position_interpolation)
        size = pixel_values.shape[-1]
        compiled, graph_streams = self.compiled(size, layers_by_start)
        positions = self.positions(size, position_interpolation)
        results = compiled.create_infer_request().infer({0: pixel_values.float().cpu().numpy(), 1: positions})
        outputs = [torch.from_numpy(np.array(value, copy=True)) for value in results.to_tuple()]
        grid_size = size // self.backbone.vision_config.patch_size
        return features_from_outputs(outputs, graph_streams, layers_by_start, grid_size, size, position_interpolation)

    def positions(self, size: int, position_interpolation: str) -> np.ndarray:
        """The graph's positional-embedding input for this size and interpolation, in float32 (the graph's input
        precision, whatever it computes in)."""
        grid_size = size // self.backbone.vision_config.patch_size
        with torch.inference_mode():
            return self.backbone.position_embeddings(grid_size, position_interpolation, torch.float32).cpu().numpy()

    def compiled(self, size: int, layers_by_start: dict) -> tuple:
        """(the compiled graph serving this pass, the streams it outputs): one compiled already that covers the pass
        (``covers``), else a cache folder's graph that covers it, else the one of the cache folder for these streams
        (built there first when missing or damaged)."""
        num_layers = self.backbone.vision_config.num_hidden_layers
        with self._lock:
            for (graph_size, graph_streams), compiled in self._compiled.items():
                if graph_size == size and covers(dict(graph_streams), layers_by_start, num_layers):
                    return compiled, dict(graph_streams)
            streams = self.cached_covering_streams(size, layers_by_start) or layers_by_start
            inputs = self.graph_inputs(size, streams)
            compiled = cached_graph(self.cache_dir, inputs, lambda folder: self._build(folder, size, streams))
            self._compiled[(size, stream_key(streams))] = compiled
            return compiled, dict(stream_key(streams))

    def cached_covering_streams(self, size: int, layers_by_start: dict) -> dict | None:
        """The streams of a graph in the cache folder, built for this backbone, size, precision and int8, that serves
        ``layers_by_start`` (``covers``): a wider pass's graph, so a narrower pass first seen after a restart (or after
        ``release``) is not built again. Its files are checked when it is read (``cached_graph``)."""
        wanted = {key: value for key, value in self.graph_inputs(size, layers_by_start).items() if key != "streams"}
        for manifest in sorted(self.cache_dir.glob(f"*/{MANIFEST}")):
            try:
                inputs = json.loads(manifest.read_text())["inputs"]
                streams = {start: list(layers) for start, layers in inputs["streams"]}
            except (OSError, ValueError, KeyError, TypeError):
                continue
            same_graph = {key: value for key, value in inputs.items() if key != "streams"} == wanted
            if same_graph and covers(streams, layers_by_start, self.backbone.vision_config.num_hidden_layers):
                return streams
        return None

    def _build(self, folder: Path, size: int, layers_by_start: dict) -> None:
        build_openvino_graph(self.backbone, folder, size, layers_by_start, WEIGHTS_IN_FLOAT16[self.precision], self.int8)

    def release(self) -> None:
        """Drop the compiled graphs (their memory); the next pass compiles again from the cache folder."""
        with self._lock:
            self._compiled.clear()


def covers(graph_streams: dict, layers_by_start: dict, num_layers: int) -> bool:
    """Whether a graph of ``graph_streams`` serves ``layers_by_start`` at no extra compute: the same value-value
    starts, every layer asked for among its outputs, and its last block run whole only when the pass needs it."""
    if set(graph_streams) != set(layers_by_start):
        return False
    if any(not set(layers) <= set(graph_streams[start]) for start, layers in layers_by_start.items()):
        return False
    return (num_layers in stock_taps(graph_streams)) == (num_layers in stock_taps(layers_by_start))


def features_from_outputs(outputs: list[torch.Tensor], graph_streams: dict, layers_by_start: dict, grid_size: int,
                          size: int, position_interpolation: str) -> dict:
    """The graph's flat outputs (each of ``graph_streams``' layers in ``stream_key`` order, then image_embeds and
    class_token) as ``encode_image_streams`` returns ``layers_by_start`` (each stream's layers a subset of the graph's)."""
    image_embeds, class_token = outputs[-2], outputs[-1]
    tokens = iter(outputs[:-2])
    by_start = {start: {layer: next(tokens) for layer in layers} for start, layers in stream_key(graph_streams)}
    return {start: ImageFeatures(list(layers), [by_start[start][layer] for layer in layers], image_embeds, grid_size, size,
                                 start, position_interpolation, class_token)
            for start, layers in layers_by_start.items()}


class VisionGraph(torch.nn.Module):
    """``CLIPBackbone.vision_tower`` for fixed streams, with flat outputs (what an exported graph returns); the
    positional embeddings are its second input."""

    def __init__(self, backbone: CLIPBackbone, layers_by_start: dict):
        super().__init__()
        self.backbone = backbone
        self.streams = {start: list(layers) for start, layers in stream_key(layers_by_start)}

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> tuple:
        taps, image_embeds, class_token = self.backbone.vision_tower(pixel_values, positions, self.streams)
        return (*[token for start in self.streams for token in taps[start]], image_embeds, class_token)


def build_openvino_graph(backbone: CLIPBackbone, folder: Path, size: int, layers_by_start: dict, weights_in_float16: bool,
                         int8: str | None = None) -> None:
    """Export the vision pass (``torch.export``, batch left free) of a float32 copy of ``backbone`` and write it as
    OpenVINO IR to ``folder`` (the precision it computes in is chosen when it is compiled), made int8 by NNCF where
    ``int8`` says (a value of ``OPENVINO_INT8``)."""
    import openvino as ov

    float_backbone = float32_copy(backbone)
    pixels = torch.randn(EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    positions = float_backbone.position_embeddings(size // backbone.vision_config.patch_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.export.export(VisionGraph(float_backbone, layers_by_start).eval(), (pixels, positions),
                                      dynamic_shapes=({0: batch}, None))
    model = ov.convert_model(program)
    model.reshape({model.input(0): ov.PartialShape([-1, 3, size, size]), model.input(1): ov.PartialShape(list(positions.shape))})
    if int8 == "weights":
        import nncf

        model = nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, INT8_WEIGHTS))
    elif int8 == "weights and activations":
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        samples = [{0: image[None].numpy(), 1: positions.numpy()} for image in calibration_pixels(backbone, size, CALIBRATION_IMAGES)]
        # Each activation's range over all the images (the transformer preset's default averages each image's): on the
        # tiny CLIP, features at Pearson 0.99954 to float32 on another photo-like image against 0.99909.
        ranges = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
        with logger_level("nncf", logging.ERROR):
            model = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
                                  fast_bias_correction=True, advanced_parameters=ranges)
    ov.save_model(model, str(folder / GRAPH_FILES[0]), compress_to_fp16=weights_in_float16)


def calibration_pixels(backbone: CLIPBackbone, size: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` photo-like images (count, 3, size, size), normalised as ``backbone`` normalises its input, made the
    same on every machine: noise summed over octaves, each channel a mix of a shared luminance and its own colour, with
    amplitude proportional to scale ** slope. Slope 1 is the 1/f spectrum of natural images; the slopes run from 0
    (fine texture, as a woven or brushed surface) to 1.5 (smooth shading), one image at slope 1. The int8 activations'
    ranges are set on these, and ``auto`` checks a quantised route's fidelity on others (another seed)."""
    generator = torch.Generator().manual_seed(seed)
    slopes = torch.linspace(0.0, 1.5, count) if count > 1 else torch.ones(1)
    images = torch.zeros(count, 3, size, size)
    cell = size
    while cell >= 2:
        grid = max(1, size // cell)
        luminance = torch.rand(count, 1, grid + 1, grid + 1, generator=generator)
        colour = torch.rand(count, 3, grid + 1, grid + 1, generator=generator)
        octave = torch.nn.functional.interpolate(0.7 * luminance + 0.3 * colour, size=(size, size), mode="bilinear", align_corners=True)
        images += (cell / size) ** slopes.view(count, 1, 1, 1) * octave
        cell //= 2
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low)
    mean = torch.tensor(backbone.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


def float32_copy(backbone: CLIPBackbone) -> CLIPBackbone:
    """A float32 copy of ``backbone``'s CLIP (int8 text linears dequantised), for export only; ``backbone`` is left as it is."""
    clip = copy.deepcopy(backbone.model).float()
    for parent in list(clip.modules()):  # the text linears too: torch.export reads every module the graph holds
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.ao.nn.quantized.dynamic.Linear):
                setattr(parent, child_name, dequantized_linear(child))
    return CLIPBackbone(clip, backbone.tokenizer, backbone.image_mean, backbone.image_std)


def dequantized_linear(quantized) -> torch.nn.Linear:
    weight, bias = quantized.weight().dequantize(), quantized.bias()
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def weights_identity(backbone: CLIPBackbone) -> dict:
    """What names the backbone's weights: its Hub id and revision, or a local folder's weight files (name, size,
    modification time); a backbone built in memory is named by the SHA-256 of its vision weights."""
    config = backbone.model.config
    source = config._name_or_path
    folder = Path(source) if source else None
    if folder is not None and folder.is_dir():
        files = sorted(path for path in folder.iterdir() if path.suffix in (".safetensors", ".bin"))
        stats = [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]
        return {"folder": str(folder.resolve()), "files": stats}
    if source and getattr(config, "_commit_hash", None):
        return {"hub_id": source, "revision": config._commit_hash}
    return {"vision_sha256": state_digest(backbone.model.vision_model.state_dict())}


def state_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(state.items()):
        if isinstance(value, torch.Tensor):
            tensor = value.dequantize() if value.is_quantized else value
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def graph_fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


# ----- the cache folder -------------------------------------------------------------------------------------------


def cached_graph(cache_dir: Path, inputs: dict, build):
    """The compiled graph of the cache folder for ``inputs``, built there by ``build(folder)`` first when the folder
    is missing or does not check out (``read_graph``). One builder at a time per folder (a file lock, released by the
    operating system if its holder dies); the others wait, then read what it wrote."""
    fingerprint = graph_fingerprint(inputs)
    folder = cache_dir / fingerprint
    compiled = read_graph(folder, fingerprint)
    if compiled is not None:
        return compiled
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{fingerprint}.lock")):
        compiled = read_graph(folder, fingerprint)
        if compiled is None:
            write_cache_folder(folder, fingerprint, inputs, build)
            compiled = read_graph(folder, fingerprint)
    if compiled is None:
        raise ZSADError(f"The vision graph written to {folder} cannot be read back; remove that folder and retry, or use --engine torch.")
    return compiled


def read_graph(folder: Path, fingerprint: str):
    """The compiled graph of ``folder``, or None unless its manifest names ``fingerprint`` and every file is there
    with the SHA-256 the manifest records. The bytes hashed are the bytes compiled, so a file changed after the
    check is never run."""
    import openvino as ov

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("fingerprint") != fingerprint or sorted(manifest.get("files", {})) != sorted(GRAPH_FILES):
            return None
        contents = {name: (folder / name).read_bytes() for name in GRAPH_FILES}
        if any(hashlib.sha256(contents[name]).hexdigest() != manifest["files"][name] for name in GRAPH_FILES):
            return None
        core = ov.Core()
        model = core.read_model(model=contents["vision.xml"], weights=ov.Tensor(np.frombuffer(contents["vision.bin"], np.uint8)))
        precision = manifest["inputs"]["precision"]
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINTS[precision]})
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def write_cache_folder(folder: Path, fingerprint: str, inputs: dict, build) -> None:
    """``build`` into a temporary folder beside ``folder``, add the manifest, sync, and rename it into place
    (a damaged ``folder`` is moved aside and removed first)."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{fingerprint}.", dir=folder.parent))
    try:
        build(scratch)
        hashes = {name: hashlib.sha256((scratch / name).read_bytes()).hexdigest() for name in GRAPH_FILES}
        manifest = {"fingerprint": fingerprint, "inputs": inputs, "files": hashes}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        for path in scratch.iterdir():
            fsync(path)
        scratch.chmod(0o755)  # mkdtemp's folders are private; the cache is readable like the Hugging Face cache beside it
        fsync(scratch)
        if folder.exists():
            discard(folder)
        os.rename(scratch, folder)
        fsync(folder.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def discard(folder: Path) -> None:
    """Move ``folder`` aside (one rename, so its name never holds half a folder), then remove it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    os.rename(folder, aside / folder.name)
    shutil.rmtree(aside, ignore_errors=True)
