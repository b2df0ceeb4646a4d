"""One entry point for "give me a model": a method name (untrained, on a CLIP) or a checkpoint; and what a
checkpoint holds (its config, method and backbone) without loading its weights."""

import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from zsad_cli import DEVICE_HELP, PRECISIONS, add_device_argument  # noqa: F401  (the parser's vocabulary, public here too)

from .allocator import release_free_memory
from .errors import BackboneLoadError, ZSADError
from .methods import METHODS, method_of, method_of_model_type
from .modeling.clip_backbone import CLIPBackbone
from .modeling.configuration_zsad_base import DEFAULT_CLIP
from .modeling.modeling_zsad_base import ZSADPreTrainedModel

# "int8": a float32 backbone whose vision linear layers run with int8 weights and per-call int8 activations.
INT8 = torch.qint8
MISSING_BACKBONE_HINT = (
    "Without the Hub the backbone must be on disk: pass a local copy of the CLIP as --clip PATH (in Python: "
    "clip=PATH; the app also reads ZSAD_CLIP=PATH), or, to try zsad without real weights, write a tiny random CLIP with "
    "`zsad tiny-clip tiny-clip` and pass --clip tiny-clip (clip='tiny-clip')."
)
SLOW_CPU_BF16 = (
    "bfloat16 was asked for on a CPU without native bfloat16 (no AVX512-BF16/AMX): torch falls back to reference "
    "kernels there, about 100x slower than float32. Use --precision float32, or auto (int8 vision linears here)."
)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for a device name: "auto" is the first CUDA GPU when one is available, then Apple's MPS,
    else the CPU; "cpu", "cuda", "cuda:N" and "mps" are checked against what this machine has."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ZSADError(f"Unknown device '{device}'; use {DEVICE_HELP}.") from error
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (chosen.index or 0) >= count:
            raise ZSADError(f"Device '{device}' was asked for, but this machine has {count} CUDA GPU(s); use --device cpu or auto.")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ZSADError(f"Device '{device}' was asked for, but MPS is not available here; use --device cpu or auto.")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise ZSADError(f"Unknown device '{device}'; use {DEVICE_HELP}.")
    return chosen


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products in hardware (AVX512-BF16 or AMX) and torch uses its AVX512
    kernels (``ATEN_CPU_CAPABILITY=avx2`` turns them off)."""
    # torch exposes the CPU feature checks only under private names; absent ones mean "not supported".
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    has_instructions = any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    return has_instructions and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_precision(precision: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The vision backbone's dtype for a precision name on ``device`` (the text side stays float32 whatever this
    says: ``CLIPBackbone.set_vision_dtype``). "auto" picks, by where the model runs:

    | device | auto |
    |---|---|
    | CUDA GPU with bfloat16 (Ampere and newer) | bfloat16 |
    | CUDA GPU without it (T4, V100) | float16 |
    | MPS | float16 |
    | CPU with AVX512-BF16/AMX | bfloat16 |
    | other CPUs | int8 vision linears (``INT8``): 2.1x float32 on AVX2 kernels, maps within Pearson 0.99998 on random
    weights (benchmarks/bench_deploy.py); bfloat16 is ~100x slower there, and asking for it warns |
    """
    if precision not in PRECISIONS:
        raise ZSADError(f"precision must be one of {PRECISIONS}, got '{precision}'.")
    device = torch.device(device)
    if precision == "int8":
        if device.type != "cpu":
            raise ZSADError(f"int8 (dynamic int8 linears) runs on the CPU only; on {device.type} use auto, bfloat16 or float16.")
        return INT8
    if precision != "auto":
        if precision == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
            _warn_slow_cpu_bf16()
        return getattr(torch, precision)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else INT8


@functools.cache
def _warn_slow_cpu_bf16() -> None:
    warnings.warn(SLOW_CPU_BF16, RuntimeWarning, stacklevel=3)


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", INT8: "int8"}


@dataclass(frozen=True)
class Runtime:
    """Where models run and in which precision, resolved once (``Runtime.resolve``) and passed along.

    ``precision`` is a name from ``PRECISIONS`` other than "auto" (the one vocabulary of zsad: the CLI, the Space,
    exports); ``dtype`` is the vision tower's torch dtype for it (``INT8``: int8 vision linears)."""

    device: torch.device
    precision: str

    @classmethod
    def resolve(cls, device: str | torch.device | None = "auto", precision: str = "auto") -> "Runtime":
        """``resolve_device`` then ``resolve_precision`` on that device."""
        chosen = resolve_device(device)
        return cls(chosen, DTYPE_NAMES[resolve_precision(precision, chosen)])

    @property
    def dtype(self) -> torch.dtype:
        return INT8 if self.precision == "int8" else getattr(torch, self.precision)


def load_backbone(clip: str | CLIPBackbone | None = None, revision: str | None = None, dtype=None) -> CLIPBackbone:
    """A ready backbone from a Hub id or local path (default: the papers' ViT-L/14@336); a ``BackboneLoadError``
    that says how to go on without the Hub when it cannot be loaded."""
    if isinstance(clip, CLIPBackbone):
        return clip
    name = clip or DEFAULT_CLIP
    try:
        backbone = CLIPBackbone.from_pretrained(name, revision=revision, dtype=_weights_dtype(dtype))
    except ZSADError as error:
        raise BackboneLoadError(name, f"{error}\n{MISSING_BACKBONE_HINT}") from error
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


def _quantize_linears(encoder: torch.nn.Module) -> None:
    """Run by oneDNN's int8 kernels, which use what the CPU has (VNNI, AVX2) and honour ONEDNN_MAX_CPU_ISA.

    One transformer block at a time, so each block's float32 weights are freed before the next is quantised."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = "onednn"
    with warnings.catch_warnings():
        # torch deprecates its quantised tensors in favour of torchao (not a zsad dependency); the modules it builds
        # here are the ones zsad measures and serves (benchmarks/bench_deploy.py).
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning)
        for block in encoder.layers:
            # Per-channel weight scales: as fast as one scale per matrix, and closer to float32 (full-size random CLIP on
            # AVX2: image-score difference 0.0083 vs 0.0104 for StackCLIP, 0.014 vs 0.020 for GenCLIP).
            replaced = [module for module in block.modules() if isinstance(module, torch.nn.Linear)]
            quantize_dynamic(block, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
            for linear in replaced:
                # The qconfig quantize_dynamic gives each module closes over that module: a reference cycle that
                # kept every float32 Linear alive until a full garbage collection (a load peaking at 1.3x float32).
                del linear.qconfig
            release_free_memory()  # the block's float32 weights, before the next block's int8 ones are made


def load_model(model: str, backbone: CLIPBackbone | None = None, clip: str | None = None, precision: str = "auto",
               device: str | torch.device | None = "cpu", **config_overrides):
    """``model`` is a method name from ``zsad.METHODS`` ("baseline", "stackclip", "genclip": untrained,
    training-free start on ``clip``) or the path / Hub id of a saved checkpoint.

    Pass ``backbone`` to share one loaded CLIP between several models (it keeps its own precision and device); a
    backbone loaded here runs on ``device`` in ``precision`` as ``Runtime.resolve`` decides it for every surface.
    ``config_overrides`` set config fields of untrained models; of a checkpoint, only ``vv_attention_from`` (an int,
    or None for CLIP's own tokens) can be changed.
    """
    if model in METHODS:
        backbone = backbone or runtime_backbone(clip, None, Runtime.resolve(device, precision))
        name = clip or backbone.model.config._name_or_path or DEFAULT_CLIP
        return METHODS[model].from_clip(name, clip_model=backbone, **config_overrides)
    fixed = sorted(set(config_overrides) - {"vv_attention_from"})
    if fixed:
        raise ZSADError(f"Settings {fixed} apply only to untrained models {sorted(METHODS)}.")
    if backbone is None:
        backbone = runtime_backbone(*checkpoint_backbone([model]), Runtime.resolve(device, precision))
    # The method's class, not AutoModel: AutoModel deep-copies its keywords, here the whole backbone (whose caches hold
    # locks that cannot be copied).
    loaded = METHODS[checkpoint_method(model)].from_pretrained(model, clip_model=backbone).eval()
    for key, value in config_overrides.items():
        setattr(loaded.config, key, value)  # checked where it is used: CLIPBackbone.encode_image
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


def shared_backbone(clip: str | CLIPBackbone | None, checkpoints: Iterable[str], runtime: "Runtime") -> CLIPBackbone:
    """``clip`` when given, else the backbone the first checkpoint was trained on (or the default CLIP), on
    ``runtime`` (a ready ``CLIPBackbone`` keeps its own precision and device)."""
    if isinstance(clip, CLIPBackbone):
        return clip
    name, revision = (clip, None) if clip else checkpoint_backbone(checkpoints)
    return runtime_backbone(name, revision, runtime)


def runtime_backbone(clip: str | None, revision: str | None, runtime: "Runtime") -> CLIPBackbone:
    """The one way every surface (CLI, ``AnomalyDetector.load``, ``load_model``, the Space, evaluation) loads a backbone
    to serve with: vision tower and text transformer as ``runtime.precision`` says, on ``runtime.device``; so the same
    image gets the same score on each of them."""
    return text_on_the_fast_route(load_backbone(clip, revision=revision, dtype=runtime.dtype), runtime.dtype).to(runtime.device)


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
    """(name, revision) of the CLIP the first checkpoint was trained on (its local copy when present, else its Hub
    id), (None, None) without checkpoints; a ZSADError for a checkpoint that holds no zsad model."""
    for checkpoint in checkpoints:
        checkpoint_method(checkpoint)
        return checkpoint_config(checkpoint).backbone_source()
    return None, None
