"""One entry point for "give me a model": a method name (untrained, on a CLIP) or a checkpoint."""

from transformers import AutoModel

from .errors import ZSADError
from .modeling.clip_backbone import CLIPBackbone
from .modeling.configuration_zsad_base import DEFAULT_CLIP


def load_backbone(clip: str | CLIPBackbone | None = None, revision: str | None = None, dtype=None) -> CLIPBackbone:
    """A ready backbone from a Hub id or local path (default: the papers' ViT-L/14@336)."""
    if isinstance(clip, CLIPBackbone):
        return clip
    return CLIPBackbone.from_pretrained(clip or DEFAULT_CLIP, revision=revision, dtype=dtype)


def load_model(model: str, backbone: CLIPBackbone | None = None, clip: str | None = None, **config_overrides):
    """``model`` is a method name from ``zsad.METHODS`` ("baseline", "stackclip", "genclip": untrained,
    training-free start on ``clip``) or the path / Hub id of a saved checkpoint.

    Pass ``backbone`` to share one loaded CLIP between several models.
    """
    from . import METHODS  # the registry lives in the package root, which imports this module

    if model in METHODS:
        backbone = backbone or load_backbone(clip)
        name = clip or backbone.model.config._name_or_path or DEFAULT_CLIP
        return METHODS[model].from_clip(name, clip_model=backbone, **config_overrides)
    if config_overrides:
        raise ZSADError(f"Settings {sorted(config_overrides)} apply only to untrained models {sorted(METHODS)}.")
    return AutoModel.from_pretrained(model, clip_model=backbone).eval()
