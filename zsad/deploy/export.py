"""``zsad export``: one method and a fixed list of product names as a self-contained ONNX or OpenVINO graph.

The graph maps a (1, 3, S, S) normalised image to ``image_score`` (1, C) and ``anomaly_map`` (1, C, S, S), one
column per product name, at the model's input size S. It is traced from the model's own forward with the
names' text features computed beforehand, so they are constants in the graph and the tokenizer is not needed at
run time (GenCLIP's vision-enhanced prompts depend on the image, so its graph keeps the text transformer, with
the names' tokens baked in). Next to the graph, ``zsad_deploy.json`` holds what ``zsad.deploy.runtime`` needs:
pre-processing, names and thresholds.

```python
>>> from zsad.deploy.export import export
>>> export("baseline", ["metal nut"], "exported/", format="onnx", precision="int8")
>>> from zsad.deploy.runtime import ExportedDetector   # numpy + onnxruntime / openvino, no torch
>>> ExportedDetector.load("exported/").detect("part.png", "metal nut").verdict
```
"""

import json
import logging
import shutil
import tempfile
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from ..detection.fusion import scored
from ..detection.profile import ProductProfile
from ..detection.results import check_optional_threshold, thresholds
from ..modeling.class_name_filter import CNF_HARD, CNF_SOFT, ClassNameDecision, keeps_name
from ..modeling.class_names import UNNAMED_PRODUCT, clean_class_name
from ..modeling.exceptions import ZSADError
from ..modeling.image_processing_zsad import PROCESSOR_FILE
from ..modeling.modeling_genclip import GenCLIPModel
from ..runtime.atomic import atomic_folder
from ..runtime.loading import load_model
from ..runtime.methods import method_of
from ..runtime.noise import logger_level
from ..runtime.provenance import provenance
from .runtime import CONFIG_NAME, FORMATS, GRAPH_FILES, PRECISIONS, require_extra

ONNX_OPSET = 18
TORCH_ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
NNCF_LOGGER = "nncf"
# The vision transformer's linear layers are ~99% of the FLOPs; int8 is applied to them only. The heads' cosine
# similarities are multiplied by a logit scale of 100, which magnifies int8 rounding (as it does bfloat16's).
INT8_NODE_SCOPE = "vision_model.encoder"
# Operations NNCF compresses weights of; all but the vision linears are left in float32.
WEIGHTED_OPENVINO_OPS = ("MatMul", "Convolution", "Gather", "Einsum")


class ExportGraph(nn.Module):
    """(1, 3, S, S) pixels -> (scores (1, C), maps (1, C, S, S)) of ``model`` for fixed ``class_names``.

    One vision pass serves every name: the model's ``encode_image`` is memoised for the length of a forward.
    Text features the model caches (``cached_text``) are memoised by key across forwards, so those computed by a
    first, eager forward are constants when the graph is traced (the model's own cache key holds parameter
    versions, which tracing changes).
    """

    def __init__(self, model, class_names: list[str], profile: ProductProfile | None = None):
        super().__init__()
        self.model = model
        self.class_names = list(class_names)
        self.profile = profile
        self._text_features: dict = {}
        self.eval()  # the wrapper and the model: a module in training mode exports with a warning (and dropout)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with ExitStack() as stack:
            stack.enter_context(_memoised_text(self.model, self._text_features))
            if isinstance(self.model, GenCLIPModel) and self.model.config.cnf_mode == CNF_HARD:
                stack.enter_context(_class_name_filter_without_branching(self.model))
            features = self.model.encode_image(pixel_values)  # one vision pass for every name
            outputs = [self._scored(features, name) for name in self.class_names]
        return torch.stack([score for score, _ in outputs], dim=1), torch.stack([anomaly_map for _, anomaly_map in outputs], dim=1)

    def _scored(self, features, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One name's (image score, map), fused with the profile's reference images (constants) for its product."""
        profile = self.profile if self.profile is not None and name == self.profile.class_name else None
        output, fused = scored(self.model, features, [name], profile.memory if profile else None, profile.fusion if profile else None)
        result = fused or output
        return result.image_score, result.anomaly_map


@contextmanager
def _memoised_text(model, memo: dict):
    cached_text = model.cached_text

    def lookup(key, compute):
        if key not in memo:
            memo[key] = cached_text(key, compute)
        return memo[key]

    model.cached_text = lookup
    try:
        yield
    finally:
        del model.cached_text


@contextmanager
def _class_name_filter_without_branching(model: GenCLIPModel):
    """GenCLIP's "hard" CNF picks each image's prompt in Python after looking at the image, which a graph cannot
    do. A blend with weight 1 (name kept) or 0 (generic word), GenCLIP's "soft" code path, gives the same text
    features with the choice made inside the graph; both prompts are encoded."""
    config = model.config

    def filter_class_names(names, image_embeds):
        probabilities, ranks = model.class_name_probability_and_rank(names, image_embeds)
        kept = keeps_name(probabilities, ranks, config.cnf_threshold, config.cnf_top_k)
        return ClassNameDecision(CNF_SOFT, list(names), list(names), kept, probabilities, kept.to(probabilities.dtype))

    model.filter_class_names = filter_class_names
    try:
        yield
    finally:
        del model.filter_class_names


def example_pixels(model) -> torch.Tensor:
    size = model.config.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def export_onnx(graph: ExportGraph, path: Path) -> Path:
    """The dynamo exporter (``torch.export``, then onnxscript's translation and optimiser)."""
    pixels = example_pixels(graph.model)
    with torch.inference_mode():
        graph(pixels)  # fills the text-feature caches, so the features enter the graph as constants
    # The exporter's registry says, once per torchvision operator, that torchvision is not installed; zsad's graphs use none.
    with torch.no_grad(), warnings.catch_warnings(), logger_level(TORCH_ONNX_REGISTRATION_LOGGER, logging.ERROR):
        # torch.export's own pytree code calls its deprecated LeafSpec check; nothing zsad passes causes it.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            graph, (pixels,), dynamo=True, opset_version=ONNX_OPSET, input_names=["pixel_values"],
            output_names=["image_score", "anomaly_map"], verbose=False,
        )
    program.save(str(path))
    return path


def vision_linear_nodes(onnx_path: Path) -> list[str]:
    """Names of the MatMul nodes of the vision transformer's linear layers in a graph written by ``export_onnx``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {initializer.name for initializer in model.graph.initializer}
    nodes = [node.name for node in model.graph.node
             if node.op_type == "MatMul" and node.input[1] in weights and INT8_NODE_SCOPE in _module_scope(node)]
    if not nodes:
        raise ZSADError(f"No linear layer of the vision transformer was found in {onnx_path}; int8 needs a graph written by zsad export.")
    return nodes


def _module_scope(node) -> str:
    """The PyTorch module path the dynamo exporter records on each node (its optimiser renames the weights)."""
    return next((entry.value for entry in node.metadata_props if entry.key == "pkg.torch.onnx.name_scopes"), "")


def quantize_onnx_int8(source: Path, target: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation (int8 weights, activations quantised per call) of the vision
    transformer's linear layers."""
    require_extra("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_quantize=vision_linear_nodes(source),
                     extra_options={"MatMulConstBOnly": True})
    return target


def convert_openvino(onnx_path: Path, xml_path: Path, int8: bool) -> Path:
    """``openvino.convert_model`` of the fp32 ONNX graph; int8 = NNCF's int8 weight compression of the vision
    transformer's linear layers, whose activations OpenVINO's CPU plug-in quantises per call."""
    require_extra("openvino")
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    if int8:
        require_extra("nncf")
        import nncf

        vision = set(vision_linear_nodes(onnx_path))  # OpenVINO keeps the ONNX node names
        others = [op.get_friendly_name() for op in model.get_ops()
                  if op.get_type_name() in WEIGHTED_OPENVINO_OPS and op.get_friendly_name() not in vision]
        with logger_level(NNCF_LOGGER, logging.WARNING):  # its statistics table, logged at INFO to stdout
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM,
                                          ignored_scope=nncf.IgnoredScope(names=others, validate=False))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def check_profile(profile: ProductProfile, model, class_names: list[str]) -> None:
    """A ZSADError unless ``profile`` fits ``model`` and its product is among the exported names."""
    if profile.class_name not in class_names:
        raise ZSADError(f"The product profile is for '{profile.class_name}', which is not among the exported names "
                        f"{class_names}; add --class-name '{profile.class_name}'.")
    profile.check_compatible(method_of(model), profile.class_name, model.config)


def graph_thresholds(profile: ProductProfile | None, class_names: list[str], threshold: float | None) -> dict:
    """{name: {"image": t, "pixel": t, "source": ...}}: the profile's calibrated thresholds for its product (unless
    ``threshold`` is given), ``threshold`` (default 0.5) for the other names."""
    entries = {}
    for name in class_names:
        image, pixel, source = thresholds(threshold, profile.calibration if profile and name == profile.class_name else None)
        entries[name] = {"image": image, "pixel": pixel, "source": source}
    return entries


def deploy_config(model, class_names: list[str], format: str, precision: str, thresholds: dict, source: str,
                  profile: ProductProfile | None = None) -> dict:
    references = None if profile is None else {
        "class_name": profile.class_name, "num_references": profile.num_references, "fusion_weight": profile.fusion.weight,
        "calibration": profile.calibration.describe() if profile.calibration else "uncalibrated", "created": profile.created}
    return {
        "zsad_deploy_version": 2,  # 2: the pre-processing lives in preprocessor_config.json only
        "method": method_of(model),
        "model": source,
        "format": format,
        "precision": precision,
        "graph": GRAPH_FILES[format],
        "class_names": class_names,
        "thresholds": thresholds,
        "references": references,
        "provenance": provenance(model, name_or_path=source, precision=precision, device="cpu", vision_engine=f"{format} graph"),
        "inputs": {"pixel_values": [1, 3, model.config.image_size, model.config.image_size]},
        "outputs": {"image_score": [1, len(class_names)], "anomaly_map": [1, len(class_names), model.config.image_size,
                                                                         model.config.image_size]},
    }


def export(
    model,
    class_names: list[str],
    out_dir: str | Path,
    format: str = "onnx",
    precision: str = "float32",
    profile: str | Path | ProductProfile | None = None,
    threshold: float | None = None,
    clip: str | None = None,
    image_size: int | None = None,
) -> Path:
    """Write the graph and ``zsad_deploy.json`` to ``out_dir``; ``model`` is a loaded zsad model, a method name
    or a checkpoint path / Hub id. A product ``profile`` (or its folder) puts its reference images in the graph,
    as constants, for its product's column, with its calibrated thresholds. Returns the graph's path."""
    if format not in FORMATS:
        raise ZSADError(f"--format must be one of {FORMATS}, got '{format}'.")
    if precision not in PRECISIONS:
        raise ZSADError(f"--precision must be one of {PRECISIONS}, got '{precision}'.")
    require_extra("onnx", "onnxscript", *(["openvino"] if format == "openvino" else []))
    check_optional_threshold(threshold)
    if isinstance(profile, (str, Path)):
        profile = ProductProfile.load(profile)
    source = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or method_of(model)
    if isinstance(model, str):
        overrides = {"image_size": image_size} if image_size else {}
        model = load_model(model, clip=clip, precision="float32", **overrides)
    names = list(dict.fromkeys(clean_class_name(name) for name in class_names or ([profile.class_name] if profile else [])))
    if not names and not model.config.uses_class_names:
        names = [UNNAMED_PRODUCT]  # prompts that name no product: one column, whatever the product
    if not names:
        raise ZSADError("Give at least one --class-name: the product names the exported graph scores.")
    if profile is not None:
        check_profile(profile, model, names)
    if model.require_backbone().dtype != torch.float32:
        model.require_backbone().set_vision_dtype(torch.float32)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ZSADError(f"--out {out_dir} is a file; give a folder (new, empty or an earlier export) for the graph and {CONFIG_NAME}.")
    # One artefact: a kill leaves the earlier export or this one, never one's graph with the other's config.
    with atomic_folder(out_dir, marker=CONFIG_NAME) as staging, tempfile.TemporaryDirectory() as scratch:
        direct = format == "onnx" and precision == "float32"
        fp32 = staging if direct else Path(scratch)
        export_onnx(ExportGraph(model, names, profile), fp32 / GRAPH_FILES["onnx"])
        config = deploy_config(model, names, "onnx", "float32", graph_thresholds(profile, names, threshold), str(source), profile)
        (fp32 / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
        model.image_processor.save_pretrained(fp32)
        if not direct:
            write_converted_graph(fp32, staging, format, precision)
    return out_dir / GRAPH_FILES[format]


def convert_graph_folder(source: str | Path, out_dir: str | Path, format: str, precision: str) -> Path:
    """A graph folder of another format / precision made from a float32 ONNX folder written by ``export`` (as
    ``export`` itself makes them), written as one artefact like ``export``'s. Returns the graph's path."""
    with atomic_folder(out_dir, marker=CONFIG_NAME) as staging:
        write_converted_graph(Path(source), staging, format, precision)
    return Path(out_dir) / GRAPH_FILES[format]


def write_converted_graph(source: Path, target: Path, format: str, precision: str) -> None:
    """The graph converted from ``source``'s float32 ONNX graph, its ``preprocessor_config.json`` and its
    ``zsad_deploy.json`` naming the new format and precision, into the folder ``target``."""
    config = json.loads((source / CONFIG_NAME).read_text())
    if (config["format"], config["precision"]) != ("onnx", "float32"):
        raise ZSADError(f"{source} holds a {config['format']} {config['precision']} graph; convert from a float32 ONNX export.")
    onnx_path, graph_path = source / GRAPH_FILES["onnx"], target / GRAPH_FILES[format]
    if format == "openvino":
        convert_openvino(onnx_path, graph_path, int8=precision == "int8")
    elif precision == "int8":
        quantize_onnx_int8(onnx_path, graph_path)
    else:
        shutil.copyfile(onnx_path, graph_path)
    shutil.copyfile(source / PROCESSOR_FILE, target / PROCESSOR_FILE)
    provenance_block = {**config["provenance"], "precision": precision}
    config.update(format=format, precision=precision, graph=graph_path.name, provenance=provenance_block)
    (target / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
