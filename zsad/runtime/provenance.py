"""What made a result: one provenance block, written into every result file (``scores.json`` and each of its records,
``evaluation.json``, product profiles, ``zsad_deploy.json``) and shown by the Space, and its short form for summaries.

```python
>>> block = provenance(model, class_name_given="Metal Nut", class_name_used="metal nut", threshold_rule=rule)
>>> short_form(block)
'stackclip (untrained) on CLIP ViT-L/14@336, bfloat16 on CPU, 518 px'
```

The block::

    {"zsad_version": "0.1.0", "method": "stackclip", "status": "untrained",
     "model": {"name_or_path": "stackclip", "revision": null, "adapter_sha256": "sha256:9f2c..."},
     "backbone": {"name_or_path": "/models/clip", "hub_id": "openai/clip-vit-large-patch14-336", "revision": null,
                  "tiny_random": false, "shape": {"vision_layers": 24, "vision_width": 1024, "patch_size": 14,
                  "native_image_size": 336, "text_layers": 12, "text_width": 768, "projection_dim": 768}},
     "precision": "bfloat16", "text_precision": "bfloat16", "device": "cpu", "vision_engine": "openvino bfloat16",
     "image_size": 518, "vv_attention_from": 6,
     "product": {"given": "Metal Nut", "used": "metal nut"},
     "threshold_rule": {"rule": "uncalibrated (threshold 0.5)", "image": 0.5, "pixel": 0.5}}

``zsad evaluate`` also writes the older ``model_record`` (path or Hub id, type, status, training data, adapter digest),
which ``zsad publish --eval`` compares with the checkpoint it publishes.
"""

# torch, safetensors and the model code are imported by the functions that read models: the short form and the
# noise warning are read by the torch-free runtime's summaries too (``zsad predict --engine onnx`` without torch).
import hashlib
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# What every surface says next to results of a tiny random backbone.
TINY_NOISE_WARNING = ("the backbone is a tiny random CLIP (zsad tiny-clip / --tiny): its scores and maps are noise, for tests "
                      "and UI work only")
# ViT sizes by vision width, as CLIP's model names call them.
VIT_SIZES = {768: "B", 1024: "L", 1280: "H", 1408: "g", 1664: "G"}


def zsad_version() -> str:
    try:
        return version("zsad")
    except PackageNotFoundError:
        return "unknown"


def provenance(model, *, name_or_path: str | None = None, class_name_given: str | None = None, class_name_used: str | None = None,
               threshold_rule: tuple[float, float, str] | None = None, precision: str | None = None,
               device: str | None = None, vision_engine: str | None = None) -> dict:
    """The provenance block of results of ``model`` (a loaded zsad model on its backbone), loaded from ``name_or_path``
    (default: its config's name, else its method name), for the product name given and the one used, under the
    ``zsad.detection.results.thresholds`` triple ``threshold_rule``. ``precision`` and ``device`` name what ran the model when
    it was not the backbone itself (an exported graph); by default they are read from the backbone. ``vision_engine``
    is the route that ran the vision pass (``zsad.runtime.engine``, e.g. "openvino bfloat16"), when one did."""
    from .methods import method_of, status

    config, backbone = model.config, model.require_backbone()
    image, pixel, rule = threshold_rule if threshold_rule is not None else (None, None, None)
    return {
        "zsad_version": zsad_version(),
        "method": method_of(model),
        "status": status(model),
        "model": {"name_or_path": model_reference(name_or_path or config._name_or_path or method_of(model)),
                  "revision": getattr(config, "_commit_hash", None), "adapter_sha256": model_digest(model)},
        "backbone": {"name_or_path": config.base_model_name_or_path, "hub_id": config.backbone_hub_id,
                     "revision": config.base_model_revision, "tiny_random": is_tiny_random(backbone.model.config),
                     "shape": backbone_shape(backbone)},
        "precision": precision or vision_precision(backbone),
        "text_precision": precision or text_precision(backbone),
        "device": device or str(backbone.device),
        "vision_engine": vision_engine,
        "image_size": config.image_size,
        "vv_attention_from": config.vv_attention_from,
        "product": {"given": class_name_given, "used": class_name_used},
        "threshold_rule": {"rule": rule, "image": image, "pixel": pixel},
    }


def short_form(block: Mapping) -> str:
    """One line for summaries: "stackclip (untrained) on CLIP ViT-L/14@336, bfloat16 on CPU, 518 px"."""
    device = block["device"].upper()
    return f"{block['method']} ({block['status']}) on {backbone_label(block['backbone'])}, {block['precision']} on {device}, " \
           f"{block['image_size']} px"


def backbone_label(backbone: Mapping) -> str:
    """"CLIP ViT-L/14@336" from a block's backbone; a tiny random CLIP says so."""
    if backbone["tiny_random"]:
        return "a tiny random CLIP (noise)"
    shape = backbone["shape"]
    size = VIT_SIZES.get(shape["vision_width"], f"{shape['vision_layers']}x{shape['vision_width']}")
    return f"CLIP ViT-{size}/{shape['patch_size']}@{shape['native_image_size']}"


def noise_warning(block: Mapping) -> str | None:
    """The warning every surface shows next to results of a tiny random backbone, else None."""
    return f"Warning: {TINY_NOISE_WARNING}." if block["backbone"]["tiny_random"] else None


def backbone_shape(backbone) -> dict:
    """Depths, widths, patch and native input size of a loaded backbone."""
    vision, text = backbone.vision_config, backbone.text_config
    return {"vision_layers": vision.num_hidden_layers, "vision_width": vision.hidden_size, "patch_size": vision.patch_size,
            "native_image_size": vision.image_size, "text_layers": text.num_hidden_layers, "text_width": text.hidden_size,
            "projection_dim": backbone.model.config.projection_dim}


def recorded_shape(config) -> dict:
    """The backbone shape a model config records (what its adapters were built for), in ``backbone_shape``'s keys."""
    return {"vision_layers": config.num_vision_layers, "vision_width": config.vision_hidden_size, "patch_size": config.patch_size,
            "text_width": config.text_hidden_size, "projection_dim": config.projection_dim}


def clip_config_shape(clip_config) -> dict:
    """``recorded_shape``'s keys read from a CLIP's own config (e.g. a Hub id's config.json)."""
    vision, text = clip_config.vision_config, clip_config.text_config
    return {"vision_layers": vision.num_hidden_layers, "vision_width": vision.hidden_size, "patch_size": vision.patch_size,
            "text_width": text.hidden_size, "projection_dim": clip_config.projection_dim}


def is_tiny_random(clip_config) -> bool:
    """Whether a CLIP config is a tiny random CLIP: the marker ``zsad tiny-clip`` stores, or the tiny CLIP's shape."""
    from .tiny_clip import TINY_RANDOM_MARKER, TINY_VISION_SHAPE

    vision = clip_config.vision_config
    shape = (vision.num_hidden_layers, vision.hidden_size, vision.patch_size)
    return bool(getattr(clip_config, TINY_RANDOM_MARKER, False)) or shape == TINY_VISION_SHAPE


def records_tiny_backbone(config) -> bool:
    """Whether a model config records the tiny random CLIP's shape as its backbone's."""
    from .tiny_clip import TINY_VISION_SHAPE

    return (config.num_vision_layers, config.vision_hidden_size, config.patch_size) == TINY_VISION_SHAPE


def vision_precision(backbone) -> str:
    """What the vision transformer runs in: "int8" (dynamic int8 linears), else its dtype's name."""
    return _precision(backbone.model.vision_model.encoder, backbone.dtype)


def text_precision(backbone) -> str:
    return _precision(backbone.model.text_model.encoder, backbone.text_dtype)


def _precision(encoder, dtype) -> str:
    import torch

    quantized = any(isinstance(module, torch.ao.nn.quantized.dynamic.Linear) for module in encoder.modules())
    return "int8" if quantized else str(dtype).removeprefix("torch.")


def adapter_digest(tensors: Mapping) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def model_digest(model) -> str:
    """The adapter digest of a loaded model (the same as ``checkpoint_digest`` of the folder it saves to)."""
    from ..modeling.modeling_zsad_base import BACKBONE_PREFIX

    return adapter_digest({name: value for name, value in model.state_dict().items() if not name.startswith(BACKBONE_PREFIX)})


def checkpoint_digest(folder) -> str:
    """The adapter digest of a checkpoint folder's safetensors weights, read without loading the model."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return adapter_digest(tensors)


def model_reference(name_or_path: str) -> str:
    """A local path made absolute (it names the same folder from any working directory); a Hub id or method name as is."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else name_or_path


def model_record(model, name_or_path: str) -> dict:
    """What ``zsad evaluate`` writes as ``evaluated_model`` for ``model``, loaded from ``name_or_path``."""
    from .methods import status

    config = model.config
    return {
        "name_or_path": model_reference(name_or_path),
        "model_type": config.model_type,
        "status": status(config),
        "training_dataset": getattr(config, "training_dataset", None),
        "training_categories": getattr(config, "training_categories", None),
        "adapter_digest": model_digest(model),
    }
