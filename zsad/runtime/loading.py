"""One entry point for "give me a model": a method name (untrained, on a CLIP) or a checkpoint; and what a
checkpoint holds (its config, method and backbone) without loading its weights."""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from zsad_cli.choices import DEVICE_HELP

from ..modeling.clip_backbone import CLIPBackbone
from ..modeling.configuration_zsad_base import DEFAULT_CLIP
from ..modeling.exceptions import ZSADError
from ..modeling.modeling_zsad_base import ZSADPreTrainedModel
from ..modeling.precision import DTYPE_NAMES, INT8, load_backbone_in, resolve_precision, text_on_the_fast_route
from .errors import BackboneLoadError
from .methods import METHODS, method_of, method_of_model_type

MISSING_BACKBONE_HINT = (
    "Without the Hub the backbone must be on disk: pass a local copy of the CLIP as --clip PATH (in Python: "
    "clip=PATH; the app also reads ZSAD_CLIP=PATH), or, to try zsad without real weights, write a tiny random CLIP with "
    "`zsad tiny-clip tiny-clip` and pass --clip tiny-clip (clip='tiny-clip')."
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


@dataclass(frozen=True)
class Runtime:
    """Where models run and in which precision, resolved once (``Runtime.resolve``) and passed along.

    ``precision`` is a name from ``PRECISIONS`` other than "auto" (the one vocabulary of zsad: the CLI, the Space,
    exports); ``dtype`` is the vision tower's torch dtype for it (``INT8``: int8 vision linears). ``precision_chosen``:
    it was "auto", so ``--engine auto`` may also run the vision tower on an int8 graph where that measures faster and
    agrees with torch (an explicit precision is kept as asked)."""

    device: torch.device
    precision: str
    precision_chosen: bool = False

    @classmethod
    def resolve(cls, device: str | torch.device | None = "auto", precision: str = "auto") -> "Runtime":
        """``resolve_device`` then ``resolve_precision`` on that device."""
        chosen = resolve_device(device)
        return cls(chosen, DTYPE_NAMES[resolve_precision(precision, chosen)], precision == "auto")

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
        return load_backbone_in(name, revision, dtype)
    except ZSADError as error:
        raise BackboneLoadError(name, f"{error}\n{MISSING_BACKBONE_HINT}") from error


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
