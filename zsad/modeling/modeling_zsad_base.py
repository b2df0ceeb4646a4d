"""What every zsad model shares: a frozen CLIP backbone that is never saved, adapter-only checkpoints,
loading the backbone named in the config, a text-feature cache, and the output type."""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPModel, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import SAFE_WEIGHTS_NAME, ModelOutput

from .anomaly_maps import combine_layer_maps, image_scores, scaled_sigma, upsample_patch_maps
from .clip_backbone import CLIPBackbone, ImageFeatures
from .clip_loading import image_normalisation
from .configuration_zsad_base import ZSADBaseConfig, backbone_reference, lineage_vv_attention_from
from .exceptions import ZSADError
from .image_processing_zsad import ZSADImageProcessor
from .losses import image_loss, segmentation_loss
from .lru_cache import LRUCache
from .pipeline_zsad import ZeroShotAnomalyDetectionPipeline, custom_pipelines

BACKBONE_PREFIX = "clip."
TEXT_CACHE_SIZE = 256


@dataclass
class ZeroShotAnomalyOutput(ModelOutput):
    """Output of every zsad model (the methods' outputs add their own parts).

    Args:
        loss: training loss, when ``masks`` or ``labels`` are given.
        anomaly_map: (B, S, S) smoothed abnormal probability at the model's input size S, in [0, 1].
        image_score: (B,) anomaly score in [0, 1].
        global_score: (B,) abnormal probability from the global image feature.
        map_score: (B,) maximum of ``anomaly_map``.
        layer_maps: (B, L, S, S) unsmoothed abnormal maps of each tapped layer.
    """

    loss: torch.Tensor | None = None
    anomaly_map: torch.Tensor | None = None
    image_score: torch.Tensor | None = None
    global_score: torch.Tensor | None = None
    map_score: torch.Tensor | None = None
    layer_maps: torch.Tensor | None = None

    def image_details(self, index: int):
        """Image ``index``'s method-specific parts as a small dataclass of plain values (None: the method has none)."""
        return None


def _backbone_dimensions(backbone: CLIPBackbone) -> dict:
    vision, text = backbone.vision_config, backbone.text_config
    return {
        "num_vision_layers": vision.num_hidden_layers,
        "patch_size": vision.patch_size,
        "vision_hidden_size": vision.hidden_size,
        "text_hidden_size": text.hidden_size,
        "projection_dim": backbone.model.config.projection_dim,
    }


def default_model_card(config: ZSADBaseConfig, model_name: str) -> str:
    """A short, true card written with every save; ``zsad publish`` replaces it with the full template."""
    status = "trained" if config.is_trained else "untrained (training-free start: CLIP's own features and prompts)"
    settings = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(config.to_diff_dict().items()))
    return (
        f"---\nbase_model: {config.base_model_name_or_path}\nlibrary_name: transformers\n"
        f"pipeline_tag: image-segmentation\ninference: false\ntags:\n- zsad\n- anomaly-detection\n- zero-shot\n- clip\n---\n\n"
        f"# {model_name} for zero-shot anomaly detection\n\n"
        f"Status: **{status}**. Backbone: `{config.base_model_name_or_path}` (frozen, not stored here).\n\n"
        "```python\nfrom transformers import pipeline\n"
        "detector = pipeline(model=REPO_OR_PATH, trust_remote_code=True)\n"
        "result = detector('part.png', class_name='bottle')  # score, verdict, mask (PIL), anomaly_map\n```\n\n"
        f"| setting | value |\n|---|---|\n{settings}\n"
    )


class ZSADPreTrainedModel(PreTrainedModel):
    """Base class of the zsad method models.

    The frozen CLIP lives in ``self.clip`` (a :class:`CLIPBackbone`) and is attached after construction
    (``from_clip``, ``from_pretrained`` or ``attach_backbone``), so that checkpoints hold only the small
    trainable adapters and several models can share one backbone. Subclasses build their adapters in
    ``__init__`` and end it with ``self.post_init()``.
    """

    config_class = ZSADBaseConfig
    base_model_prefix = "zsad"
    main_input_name = "pixel_values"
    _supports_sdpa = True
    # False for a method with nothing to train (the baseline): its status is "training-free".
    has_adapters = True
    # False for a method whose untrained start is a random one (AnomalyCLIP's learned prompts): the Space offers it
    # only with a trained checkpoint.
    works_untrained = True
    # train/train.py's defaults for this method where they differ from its generic ones (epochs, batch_size, lr,
    # betas); input size and tapped layers are config fields.
    training_recipe: dict = {}

    def __init__(self, config: ZSADBaseConfig):
        super().__init__(config)
        self.clip = None
        self._text_cache = LRUCache(TEXT_CACHE_SIZE)

    def _init_weights(self, module):
        # Adapters get their training-free start from the backbone in ``init_from_backbone``.
        pass

    # ----- construction and loading -------------------------------------------------------------

    @classmethod
    def from_clip(cls, clip_name_or_path: str, revision: str | None = None, clip_model=None, clip_dtype=None, **config_overrides):
        """An untrained (training-free) model on the given CLIP, in eval mode; ``config_overrides`` set config fields
        (``vv_attention_from`` defaults to ``lineage_vv_attention_from`` of the backbone's depth)."""
        backbone = _as_backbone(clip_model, clip_name_or_path, revision) if clip_model is not None else (
            CLIPBackbone.from_pretrained(clip_name_or_path, revision=revision, dtype=clip_dtype)
        )
        dimensions = _backbone_dimensions(backbone)
        lineage = {"vv_attention_from": lineage_vv_attention_from(dimensions["num_vision_layers"])}
        settings = {**dimensions, **lineage, **backbone_reference(clip_name_or_path, revision), **config_overrides}
        config = cls.config_class(**settings)
        model = cls(config)
        model.attach_backbone(backbone)
        model.init_from_backbone()
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, clip_model=None, clip_dtype=None, **kwargs):
        """Load adapters from a folder or Hub repo, then the backbone named in the config unless
        ``clip_model`` (a ready ``CLIPModel`` or ``CLIPBackbone``) is given to share one.

        Loading is strict: weights missing from the file (transformers would leave them uninitialised), unexpected or
        of the wrong shape (a ``model_type`` that does not match the weights), or not finite are a ZSADError."""
        wants_loading_info = kwargs.pop("output_loading_info", False)
        # transformers then lists wrong-shaped tensors by name instead of raising a generic error; they are refused below.
        kwargs["ignore_mismatched_sizes"] = True
        try:
            model, loading_info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                                          **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
            raise ZSADError(
                f"Could not load the zsad checkpoint '{pretrained_model_name_or_path}': {error}\n"
                "Check the path or Hub id; a checkpoint folder needs config.json and model.safetensors as written "
                "by save_pretrained. If the weights file is truncated, download or save it again."
            ) from error
        check_loaded_weights(pretrained_model_name_or_path, model, loading_info)
        config = model.config
        backbone = (
            _as_backbone(clip_model, config.base_model_name_or_path, config.base_model_revision)
            if clip_model is not None
            else CLIPBackbone.from_pretrained(*config.backbone_source(), dtype=clip_dtype)
        )
        model.attach_backbone(backbone)
        return (model.eval(), loading_info) if wants_loading_info else model.eval()

    def attach_backbone(self, backbone: CLIPBackbone) -> None:
        """Use ``backbone`` (kept frozen) for this model after checking it matches the config's dimensions."""
        expected = {key: getattr(self.config, key) for key in _backbone_dimensions(backbone)}
        found = _backbone_dimensions(backbone)
        if expected != found:
            raise ZSADError(
                f"This checkpoint was made for a backbone with {expected}, but the given CLIP has {found}. "
                f"Use the backbone it was trained on: {self.config.base_model_name_or_path}."
            )
        self.clip = backbone
        backbone.model.requires_grad_(False)
        backbone.train(False)
        self.to(backbone.device)
        self._text_cache.clear()

    def init_from_backbone(self) -> None:
        """Set adapters to their training-free start (METHODS.md); models without adapters do nothing."""

    def prepare_for_training(self, class_names: list[str]) -> None:
        """Called by the training command with the auxiliary dataset's category names before the first
        step (StackCLIP clusters them here); models that need nothing do nothing."""

    def require_backbone(self) -> CLIPBackbone:
        if self.clip is None:
            raise ZSADError(
                "No CLIP backbone is attached. Build models with from_clip(...) or from_pretrained(...), "
                "or call attach_backbone(CLIPBackbone.from_pretrained(name))."
            )
        return self.clip

    # ----- saving -------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights except the frozen backbone's."""
        return {key: value for key, value in self.state_dict().items() if not key.startswith(BACKBONE_PREFIX)}

    @property
    def image_processor(self) -> ZSADImageProcessor:
        """This model's pre- and post-processing: its input size and its backbone's normalisation."""
        backbone = self.require_backbone()
        return ZSADImageProcessor(self.config.image_size, backbone.image_mean, backbone.image_std)

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith(BACKBONE_PREFIX)]

    def save_pretrained(self, save_directory, *args, model_card: str | None = None, **kwargs):
        """Adapter-only ``save_pretrained`` that also writes a model card (README.md) and the checkpoint's
        transformers pipeline (``pipeline_zsad.py``, named in config.json's ``custom_pipelines``)."""
        state_dict = self.adapter_state_dict()
        has_weights = bool(state_dict)  # transformers empties the dict while writing it
        kwargs["state_dict"] = state_dict
        self.config.custom_pipelines = custom_pipelines()
        super().save_pretrained(save_directory, *args, **kwargs)
        custom_object_save(ZeroShotAnomalyDetectionPipeline, save_directory)
        if self.clip is not None:
            self.image_processor.save_pretrained(save_directory)
        if not has_weights:
            # transformers writes no weights file for an empty state dict, but from_pretrained needs one.
            save_file({}, os.path.join(save_directory, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        card = model_card if model_card is not None else default_model_card(self.config, type(self).__name__)
        with open(os.path.join(save_directory, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str = "5GB", model_card: str | None = None):
        """One Hub commit with weights, config, code and our model card (never transformers' blank card).

        The keywords are those of transformers' ``push_to_hub`` that apply to adapter-only checkpoints; any other is a
        ``TypeError`` rather than silently ignored.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, model_card=model_card, max_shard_size=max_shard_size)
            files = {path.relative_to(folder).as_posix(): path for path in sorted(Path(folder).rglob("*")) if path.is_file()}
            return commit_files(
                repo_id, files, commit_message or f"Upload {type(self).__name__}", commit_description=commit_description,
                private=private, token=token, revision=revision, create_pr=create_pr,
            )

    def train(self, mode: bool = True):
        super().train(mode)
        if self.clip is not None:
            self.clip.train(False)
        return self

    # ----- shared forward pieces ---------------------------------------------------------------

    def vision_streams(self) -> dict:
        """{value-value start (None: the stock tokens): tapped layers} this model reads from one vision pass."""
        return {self.config.vv_attention_from: list(self.config.feature_layers)}

    def features_from_streams(self, streams: dict) -> ImageFeatures:
        """This model's features out of one pass's streams ({start: ImageFeatures}, ``encode_image_streams``)."""
        start = self.config.vv_attention_from
        if start not in streams:
            raise ZSADError(f"These image features hold the streams {list(streams)}, the model reads vv_attention_from={start}; "
                            "encode them with model.vision_streams().")
        return streams[start].select(self.config.feature_layers, start, self.config.position_interpolation)

    def encode_image(self, pixel_values: torch.Tensor | None, image_features=None) -> ImageFeatures:
        """This model's layers of ``image_features`` when given (one vision pass shared by several models on the
        backbone: an ``ImageFeatures`` or the dict of streams ``encode_image_streams`` returns), else a vision pass
        over ``pixel_values``."""
        if isinstance(image_features, dict):
            return self.features_from_streams(image_features)
        if image_features is not None:
            return image_features.select(self.config.feature_layers, self.config.vv_attention_from, self.config.position_interpolation)
        if pixel_values is None:
            raise ZSADError("Pass pixel_values (a (batch, 3, size, size) tensor) or image_features from encode_image.")
        streams = self.require_backbone().encode_image_streams(
            pixel_values, self.vision_streams(), position_interpolation=self.config.position_interpolation
        )
        return self.features_from_streams(streams)

    def cached_text(self, key: tuple, compute):
        """``compute()`` once per key while no parameter changes; training (grad enabled) bypasses the cache.

        Parameter version counters are part of the key, so an optimiser step or load_state_dict
        invalidates entries of text features that depend on learnable prompts. Features of the frozen
        backbone alone are cached on the backbone instead (``CLIPBackbone.frozen_features``).
        """
        adapters = self.adapter_parameters()
        if torch.is_grad_enabled() and any(p.requires_grad for p in adapters):
            return compute()
        versions = tuple(p._version for p in adapters)
        backbone = self.require_backbone()
        return self._text_cache.get((key, versions, backbone.dtype, str(backbone.device)), compute)

    def maps_from_layer_probs(self, layer_probs: list[torch.Tensor], grid_size: int, image_size: int):
        """Per-layer (B, 2, N) state probabilities -> (2-channel maps per layer, smoothed abnormal map)."""
        state_maps = [upsample_patch_maps(probs, grid_size, image_size) for probs in layer_probs]
        layer_maps = torch.stack([maps[:, 1] for maps in state_maps], dim=1)
        sigma = scaled_sigma(self.config.smoothing_sigma, image_size, self.config.smoothing_reference_size)
        return state_maps, layer_maps, combine_layer_maps(layer_maps, sigma)

    def build_output(self, state_maps, layer_maps, anomaly_map, global_logits, masks=None, labels=None,
                     output_class=ZeroShotAnomalyOutput, **parts):
        """Scores, maps and (when targets are given) the summed segmentation + image loss, as ``output_class`` with
        the method's own ``parts``."""
        global_score = global_logits.float().softmax(dim=-1)[:, 1]
        image_score, map_score = image_scores(global_score, anomaly_map, self.config.image_score_map_weight)
        loss = None
        if masks is not None:
            loss = sum(segmentation_loss(maps, masks) for maps in state_maps)
        if labels is not None:
            loss = image_loss(global_logits, labels) + (0.0 if loss is None else loss)
        return output_class(
            loss=loss,
            anomaly_map=anomaly_map.clamp(0.0, 1.0),
            image_score=image_score.clamp(0.0, 1.0),
            global_score=global_score,
            map_score=map_score,
            layer_maps=layer_maps,
            **parts,
        )


def check_loaded_weights(source, model: "ZSADPreTrainedModel", loading_info: dict) -> None:
    """A ZSADError naming what is wrong when the file's tensors are not exactly the model's adapters, or not finite."""
    problems = {"missing": loading_info.get("missing_keys"), "unexpected": loading_info.get("unexpected_keys"),
                "of the wrong shape": loading_info.get("mismatched_keys")}
    listed = [f"{kind}: {', '.join(sorted(str(name) for name in names))}" for kind, names in problems.items() if names]
    if listed:
        raise ZSADError(
            f"The weights of the checkpoint '{source}' do not match its config (model_type '{model.config.model_type}'); "
            f"tensors {'; '.join(listed)}. The weights file or config.json was damaged, edited or copied from another "
            "checkpoint: save or download the checkpoint again."
        )
    not_finite = sorted(name for name, tensor in model.adapter_state_dict().items()
                        if tensor.is_floating_point() and not torch.isfinite(tensor).all())
    if not_finite:
        raise ZSADError(f"The checkpoint '{source}' holds NaN or infinite weights in {', '.join(not_finite)}; it cannot give "
                        "meaningful scores. Use an earlier checkpoint or train again (a lower learning rate may help).")


def _as_backbone(clip_model, fallback_name: str, revision: str | None) -> CLIPBackbone:
    """Accept a ready ``CLIPBackbone`` or a ``CLIPModel`` (its tokenizer is loaded from its own path)."""
    if isinstance(clip_model, CLIPBackbone):
        return clip_model
    if isinstance(clip_model, CLIPModel):
        source = clip_model.config._name_or_path or fallback_name
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as error:
            raise ZSADError(
                f"Could not load the tokenizer for the given CLIPModel from '{source}': {error}. "
                "Pass a zsad CLIPBackbone (model + tokenizer) instead."
            ) from error
        return CLIPBackbone(clip_model, tokenizer, *image_normalisation(source, revision))
    raise ZSADError(f"clip_model must be a transformers CLIPModel or a zsad CLIPBackbone, got {type(clip_model).__name__}.")


def commit_files(repo_id: str, files: dict, message: str, commit_description: str | None = None, private: bool | None = None,
                 token: str | None = None, revision: str | None = None, create_pr: bool = False):
    """Create the repo if needed and upload ``files`` ({path in repo: local path or bytes}) as one commit.

    ``create_commit``, not ``upload_folder``: the latter may split an upload into several commits.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for name, content in files.items()
    ]
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message=message,
                             commit_description=commit_description, revision=revision, create_pr=create_pr)
