"""One entry point for "give me a model": a method name (untrained, on a CLIP) or a checkpoint; and what a
checkpoint holds (its config, method and backbone) without loading its weights."""

from collections.abc import Iterable

import torch
from transformers import AutoConfig, AutoModel

from .errors import BackboneLoadError, ZSADError
from .methods import METHODS, method_of, method_of_model_type
from .modeling.clip_backbone import CLIPBackbone
from .modeling.configuration_zsad_base import DEFAULT_CLIP
from .modeling.modeling_zsad_base import ZSADPreTrainedModel

PRECISIONS = ("auto", "float32", "bfloat16", "int8")
# "int8": a float32 backbone whose vision linear layers run with int8 weights and per-call int8 activations.
INT8 = torch.qint8


def resolve_precision(precision: str = "auto") -> torch.dtype:
    """The backbone dtype for a precision name; "auto" picks bfloat16 where the hardware runs it natively
    (a GPU, or a CPU with AVX512-BF16/AMX), and elsewhere, where bfloat16 would be slower, int8 vision linears
    (``INT8``): 2.1x faster than float32 on AVX2 kernels, maps within Pearson 0.99998 (benchmarks/bench_deploy.py)."""
    if precision not in PRECISIONS:
        raise ZSADError(f"precision must be one of {PRECISIONS}, got '{precision}'.")
    if precision == "int8":
        return INT8
    if precision != "auto":
        return getattr(torch, precision)
    # torch exposes the CPU feature checks only under private names; absent ones mean "not supported".
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if torch.cuda.is_available() or cpu_bf16 else INT8


def load_backbone(clip: str | CLIPBackbone | None = None, revision: str | None = None, dtype=None) -> CLIPBackbone:
    """A ready backbone from a Hub id or local path (default: the papers' ViT-L/14@336)."""
    if isinstance(clip, CLIPBackbone):
        return clip
    backbone = CLIPBackbone.from_pretrained(clip or DEFAULT_CLIP, revision=revision, dtype=_weights_dtype(dtype))
    return quantize_vision_linears(backbone) if dtype == INT8 else backbone


def _weights_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    return torch.float32 if dtype == INT8 else dtype


def quantize_vision_linears(backbone: CLIPBackbone) -> CLIPBackbone:
    """PyTorch dynamic int8 quantisation of the vision transformer's linear layers (~99% of its FLOPs), in place."""
    _quantize_linears(backbone.model.vision_model.encoder)
    return backbone


def quantize_text_linears(backbone: CLIPBackbone) -> CLIPBackbone:
    """The same for the text transformer's linear layers (what a new name's prompt ensemble spends its time in)."""
    _quantize_linears(backbone.model.text_model.encoder)
    return backbone


def _quantize_linears(module: torch.nn.Module) -> None:
    """Run by oneDNN's int8 kernels, which use what the CPU has (VNNI, AVX2) and honour ONEDNN_MAX_CPU_ISA."""
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "onednn"
    quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def load_model(model: str, backbone: CLIPBackbone | None = None, clip: str | None = None, dtype=None, **config_overrides):
    """``model`` is a method name from ``zsad.METHODS`` ("baseline", "stackclip", "genclip": untrained,
    training-free start on ``clip``) or the path / Hub id of a saved checkpoint.

    Pass ``backbone`` to share one loaded CLIP between several models; ``dtype`` is the vision precision of a
    backbone loaded here.
    """
    if model in METHODS:
        backbone = backbone or load_backbone(clip, dtype=dtype)
        name = clip or backbone.model.config._name_or_path or DEFAULT_CLIP
        return METHODS[model].from_clip(name, clip_model=backbone, **config_overrides)
    if config_overrides:
        raise ZSADError(f"Settings {sorted(config_overrides)} apply only to untrained models {sorted(METHODS)}.")
    loaded = AutoModel.from_pretrained(model, clip_model=backbone, clip_dtype=_weights_dtype(dtype)).eval()
    if backbone is None and dtype == INT8:
        quantize_vision_linears(loaded.clip)
    return loaded


def load_method(method: str, checkpoint: str | None, backbone: CLIPBackbone, image_size: int | None = None) -> ZSADPreTrainedModel:
    """``method`` on ``backbone``: from ``checkpoint`` when given (which must hold that method), else untrained."""
    if checkpoint is None:
        overrides = {"image_size": image_size} if image_size else {}
        return load_model(method, backbone=backbone, **overrides)
    model = load_model(checkpoint, backbone=backbone)
    if method_of(model) != method:
        raise ZSADError(f"The checkpoint '{checkpoint}' holds a {method_of(model)} model, not a {method} model.")
    return model


def shared_backbone(clip: str | CLIPBackbone | None, checkpoints: Iterable[str], dtype) -> CLIPBackbone:
    """``clip`` when given, else the backbone the first checkpoint was trained on (or the default CLIP)."""
    if isinstance(clip, CLIPBackbone):
        return clip
    name, revision = (clip, None) if clip else checkpoint_backbone(checkpoints)
    try:
        return text_on_the_fast_route(load_backbone(name, revision=revision, dtype=dtype), dtype)
    except ZSADError as error:
        raise BackboneLoadError(name or DEFAULT_CLIP, str(error)) from error


def text_on_the_fast_route(backbone: CLIPBackbone, dtype) -> CLIPBackbone:
    """For serving only (training keeps float32 text): the text transformer in bfloat16 next to a bfloat16 vision
    tower, int8 linears next to int8 ones, so a new product name's 420-prompt ensemble does not keep a request
    waiting; its features stay within cosine 0.999 of float32 (benchmarks/bench_new_name.py)."""
    if dtype == INT8:
        return quantize_text_linears(backbone)
    return backbone.set_text_dtype(torch.bfloat16) if dtype == torch.bfloat16 else backbone


def checkpoint_config(checkpoint: str):
    """A checkpoint's config alone (no weights, no backbone)."""
    try:
        return AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError) as error:
        raise ZSADError(
            f"Could not read the config of the checkpoint '{checkpoint}': {error}\n"
            "Check the path or Hub id (a folder written by save_pretrained has a config.json)."
        ) from error


def checkpoint_method(checkpoint: str) -> str:
    """The ``zsad.METHODS`` name of the model a checkpoint holds."""
    model_type = checkpoint_config(checkpoint).model_type
    try:
        return method_of_model_type(model_type)
    except ZSADError as error:
        raise ZSADError(f"The checkpoint '{checkpoint}' holds a '{model_type}' model, which is not one of {sorted(METHODS)}.") from error


def checkpoint_backbone(checkpoints: Iterable[str]) -> tuple[str | None, str | None]:
    """(name, revision) of the CLIP the first checkpoint was trained on, (None, None) without checkpoints."""
    for checkpoint in checkpoints:
        config = checkpoint_config(checkpoint)
        return config.base_model_name_or_path, config.base_model_revision
    return None, None
