"""Settings every zsad model shares: the backbone it runs on, input size, tapped layers, map post-processing.

Each field carries its description as data (``setting(default, description)``): model cards list every field with
its value and this text (``zsad.hub.publish.config_settings``).
"""

import json
import math
import re
import types
import typing
from dataclasses import field, fields
from pathlib import Path

from huggingface_hub.dataclasses import type_validator
from transformers import PreTrainedConfig

from .clip_backbone import POSITION_INTERPOLATIONS, quarter_point_layers
from .exceptions import ZSADError

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
# A file of the Hugging Face cache lives at .../models--ORG--NAME/snapshots/COMMIT/...
HUB_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def setting(default, description: str):
    """A config field with the description a model card shows next to its value."""
    return field(default=default, metadata={"description": description})


class ZSADBaseConfig(PreTrainedConfig):
    """Base of the method configs. Backbone dimensions are read from the backbone by ``from_clip``."""

    base_model_name_or_path: str = setting(
        DEFAULT_CLIP, "Hub id, or absolute path of a local copy, of the frozen CLIP the adapters were trained on."
    )
    base_model_revision: str | None = setting(None, "Hub revision (branch, tag or commit) of that backbone.")
    base_model_hub_id: str | None = setting(
        None, "Hub id a local copy of the backbone came from; loaded from the Hub when that path is absent."
    )
    image_size: int = setting(518, "Square input side in pixels; position embeddings are interpolated to it.")
    feature_layers: list[int] | None = setting(
        None, "1-based vision blocks whose outputs are tapped (default: the quarter points of the depth)."
    )
    vv_attention_from: int | None = setting(
        None, "First vision block of the value-value attention stream (AnomalyCLIP's DPAM) whose tokens the tapped layers "
        "from there on give; None: CLIP's own tokens. from_clip sets a quarter of the depth (6 of 24, AnomalyCLIP's "
        "DPAM_layer 20); a config.json without the field (a checkpoint saved before it existed) means None."
    )
    position_interpolation: str = setting(
        "bicubic", "How the positional embeddings are resized to image_size's patch grid: 'bicubic' as transformers "
        "does, 'bilinear' as AnomalyCLIP's VisionTransformer does."
    )
    num_vision_layers: int = setting(24, "Depth of the backbone's vision transformer.")
    patch_size: int = setting(14, "The backbone's patch side in pixels.")
    vision_hidden_size: int = setting(1024, "Width of the backbone's vision transformer (input of the patch adapters).")
    text_hidden_size: int = setting(768, "Width of the backbone's text transformer (size of prompt token embeddings).")
    projection_dim: int = setting(768, "Size of CLIP's joint image-text space.")
    logit_scale: float = setting(100.0, "Temperature of the (normal, abnormal) softmax.")
    smoothing_sigma: float = setting(
        4.0, "Gaussian smoothing of the final map in pixels at smoothing_reference_size; scaled with image_size."
    )
    smoothing_reference_size: int = setting(518, "Input size at which smoothing_sigma is given.")
    image_score_map_weight: float = setting(0.5, "Image score = (1 - w) * global probability + w * max of the map.")
    is_trained: bool = setting(False, "False for a training-free model made by from_clip.")

    def __post_init__(self, **kwargs):
        check_field_types(self)
        for name in ("num_vision_layers", "patch_size", "vision_hidden_size", "text_hidden_size", "projection_dim",
                     "smoothing_reference_size"):
            check_range(name, getattr(self, name), low=1)
        check_range("image_size", self.image_size, low=self.patch_size)
        if self.feature_layers is None:
            self.feature_layers = quarter_point_layers(self.num_vision_layers)
        if not self.feature_layers or not all(1 <= layer <= self.num_vision_layers for layer in self.feature_layers):
            raise ZSADError(f"feature_layers must be a non-empty list of vision blocks in 1..{self.num_vision_layers}, "
                            f"got {self.feature_layers}.")
        if self.vv_attention_from is not None and not 1 <= self.vv_attention_from <= self.num_vision_layers:
            raise ZSADError(f"vv_attention_from must be a vision block in 1..{self.num_vision_layers} or None, "
                            f"got {self.vv_attention_from}.")
        check_range("logit_scale", self.logit_scale, low=0.0, low_open=True)
        check_range("smoothing_sigma", self.smoothing_sigma, low=0.0)
        check_range("image_score_map_weight", self.image_score_map_weight, low=0.0, high=1.0)
        if self.position_interpolation not in POSITION_INTERPOLATIONS:
            raise ZSADError(f"position_interpolation must be one of {list(POSITION_INTERPOLATIONS)}, got {self.position_interpolation!r}.")
        super().__post_init__(**kwargs)

    @property
    def uses_class_names(self) -> bool:
        """Whether the method's prompts name the product; where not, class names are accepted and not used, and may
        be left out."""
        return True

    @property
    def vision_pass(self) -> tuple[int, str]:
        """What one vision pass can be shared by: models with the same input size and position interpolation."""
        return self.image_size, self.position_interpolation

    @property
    def backbone_hub_id(self) -> str | None:
        """The backbone's Hub id: the one a local copy came from, else the name when it is not a local path."""
        if self.base_model_hub_id:
            return self.base_model_hub_id
        name = self.base_model_name_or_path
        return name if HUB_ID.match(name) and not Path(name).exists() else None

    def backbone_source(self) -> tuple[str, str | None]:
        """(name or path, revision) to load the backbone from: the local copy when it is there, else its Hub id."""
        name = self.base_model_name_or_path
        if self.base_model_hub_id and not Path(name).exists():
            return self.base_model_hub_id, self.base_model_revision
        return name, self.base_model_revision


def check_field_types(config: PreTrainedConfig) -> None:
    """Every zsad field (one declared with ``setting``) holds its annotated type, else a ZSADError naming it: a
    config.json edited to ``"image_size": "112"`` is refused here rather than failing deep inside torch.

    huggingface_hub's ``type_validator`` does the checking; its ``@strict`` decorator is not used on the classes
    because it refuses an int for a float field (``"fusion_weight": 1`` in configs already saved) and raises its own
    error type. Ints given for float fields are stored as floats here.
    """
    for config_field in fields(config):
        if "description" not in config_field.metadata:
            continue
        name, expected = config_field.name, config_field.type
        value = getattr(config, name)
        if _is_int(value) and float in _allowed_types(expected):
            value = float(value)
            setattr(config, name, value)
        try:
            type_validator(name, value, expected)
        except (TypeError, ValueError) as error:
            raise ZSADError(f"Config field '{name}' must be {_type_name(expected)}, got {value!r} "
                            f"({type(value).__name__}); fix it in config.json or pass a valid value.") from error


def check_range(name: str, value, low=None, high=None, low_open: bool = False) -> None:
    """A ZSADError unless ``value`` is finite and within [low, high] (low excluded when ``low_open``)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if not math.isfinite(value) or too_low or too_high:
        bounds = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ZSADError(f"Config field '{name}' must be a finite number in {bounds}, got {value!r}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _allowed_types(expected) -> tuple:
    """The members of a union annotation (``int | None``), else the annotation alone."""
    return typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)


def _type_name(expected) -> str:
    return " or ".join("None" if allowed is type(None) else str(allowed) if typing.get_args(allowed) else allowed.__name__
                       for allowed in _allowed_types(expected))


def backbone_reference(clip_name_or_path, revision: str | None = None, hub_id: str | None = None) -> dict:
    """The config's backbone fields for a CLIP given as a Hub id or a local path.

    A local path is stored absolute, so the checkpoint loads from any working directory. Its Hub id is ``hub_id``
    when given, else read from the copy itself: a Hugging Face cache snapshot (``models--ORG--NAME/snapshots/COMMIT``,
    which also gives the revision) or the ``_name_or_path`` its config.json recorded when it was saved.
    """
    path = Path(clip_name_or_path)
    if not path.exists():
        return {"base_model_name_or_path": str(clip_name_or_path), "base_model_revision": revision, "base_model_hub_id": hub_id}
    path = path.resolve()
    snapshot = HUB_CACHE_SNAPSHOT.search(str(path))
    if snapshot:
        hub_id = hub_id or f"{snapshot['org']}/{snapshot['name']}"
        revision = revision or snapshot["commit"]
    return {"base_model_name_or_path": str(path), "base_model_revision": revision,
            "base_model_hub_id": hub_id or _recorded_hub_id(path)}


def _recorded_hub_id(path: Path) -> str | None:
    """The Hub id a saved CLIP's config.json names as its origin (``_name_or_path``), if any."""
    try:
        recorded = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and HUB_ID.match(recorded) else None

def lineage_vv_attention_from(num_layers: int) -> int:
    """The value-value stream's first block for a depth: the first quarter point (6 of 24 is AnomalyCLIP's
    DPAM_layer = 20, since K = num_layers - DPAM_layer + 2), so every tapped layer gets the dense tokens."""
    return quarter_point_layers(num_layers)[0]
