"""Model cards and publishing: adapter-only weights + remote code + a full model card, in one Hub commit.

```python
>>> from zsad.hub.publish import publish, render_model_card
>>> card = render_model_card(model, eval_results="results/stackclip_visa.json")  # huggingface_hub.ModelCard
>>> publish("runs/stackclip-mvtec", "my-org/stackclip-mvtec", eval_json="results/stackclip_visa.json")
```

The card template is chosen by the method id (``zsad/model_cards/<method>.md``, package data, so
it is found in a source checkout and in an installed package alike) and filled from the config itself, so every
config field (the METHODS.md [choice]/[lineage] settings) appears with its value and the description kept next to the
field (``setting(default, description)`` in the config classes). Evaluation results are read and checked by
``zsad.evaluation.reports``.
"""

import dataclasses
import json
import shutil
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import CLIPConfig, PreTrainedConfig
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import CONFIG_NAME

from ..evaluation.reports import check_evaluation, load_evaluation, model_index_results, read_json, training_dataset
from ..metrics import metric_name
from ..modeling.exceptions import ZSADError
from ..modeling.modeling_zsad_base import commit_files
from ..runtime.methods import config_class, method_of, model_class, status
from ..runtime.provenance import checkpoint_digest, clip_config_shape, model_digest, recorded_shape, records_tiny_backbone

TEMPLATE_DIR = resources.files("zsad") / "model_cards"  # package data (pyproject.toml), so it ships in the wheel
MACROS_TEMPLATE = "_sections.md"


# Read from the backbone by ``from_clip``: facts about the CLIP, not method settings.
BACKBONE_FIELDS = (
    "base_model_name_or_path", "base_model_revision", "base_model_hub_id", "num_vision_layers", "patch_size",
    "vision_hidden_size", "text_hidden_size", "projection_dim",
)
# Training metadata (written by train/train.py) is shown with the training protocol.
TRAINING_METADATA_PREFIX = "training_"
TRAINING_DESCRIPTIONS = {
    "training_dataset": "Auxiliary dataset the adapters were trained on (its test split: the zero-shot protocol).",
    "training_categories": "Categories of that dataset seen in training; results on them are not zero-shot.",
    "training_epochs": "Epochs trained.",
    "training_image_size": "Input size during training.",
    "training_batch_size": "Images per step and process.",
    "training_learning_rate": "Learning rate of the adapters' optimizer.",
    "training_seed": "Seed of the run.",
    "training_zsad_version": "zsad version that trained the model.",
}
CHECKPOINT_FILE_PATTERNS = (CONFIG_NAME, "*.safetensors", "*.safetensors.index.json", "*.py")


# ----- settings from the config -----------------------------------------------------------------------------


def field_descriptions(config: PreTrainedConfig) -> dict[str, str]:
    """``name: description`` of every config field that carries one (``setting(default, description)``)."""
    return {field.name: field.metadata["description"] for field in dataclasses.fields(config) if "description" in field.metadata}


def config_settings(config: PreTrainedConfig) -> dict[str, list[dict]]:
    """The config's own fields (transformers' generic ones left out), grouped as backbone / training / method rows."""
    generic = set(PreTrainedConfig().to_dict()) | {"auto_map", "custom_pipelines"}
    descriptions = TRAINING_DESCRIPTIONS | field_descriptions(config)
    groups = {"backbone": [], "training": [], "method": []}
    for name, value in config.to_dict().items():
        if name in generic or name.startswith("_"):
            continue
        row = {"name": name, "value": _format_value(value), "description": descriptions.get(name, "")}
        groups[_settings_group(name)].append(row)
    return groups


def _settings_group(name: str) -> str:
    if name in BACKBONE_FIELDS:
        return "backbone"
    if name == "is_trained" or name.startswith(TRAINING_METADATA_PREFIX):
        return "training"
    return "method"


def _format_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ----- the card -----------------------------------------------------------------------------------------


def render_model_card(model_or_config, eval_results=None, repo_id: str | None = None) -> ModelCard:
    """The full model card of a zsad model (or its config), optionally with evaluation results.

    ``eval_results`` is anything ``load_evaluation`` accepts. An untrained model (``is_trained`` False) gets no
    results: its card says it is untrained, and passing results for it is refused; so are results of another
    method or of the untrained one, and results on the model's own training categories (``check_evaluation``).
    """
    config = getattr(model_or_config, "config", model_or_config)
    reports = load_evaluation(eval_results) if eval_results is not None else []
    model_status = status(config)
    if reports and model_status == "untrained":
        raise ZSADError(
            "This model is untrained (training-free start, config.is_trained is False); its card carries no results. "
            "Publish it without evaluation results, or train it first."
        )
    for report in reports:
        check_evaluation(report, config)
    class_name = model_class(config.model_type).__name__
    title = class_name.removesuffix("Model")
    base_model = config.backbone_hub_id  # None for a backbone known only as a local path
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=(getattr(config, "source_license", None) or "apache-2.0").lower(),  # converted weights keep theirs
        pipeline_tag="image-segmentation",
        inference=False,  # the Hub's hosted widget does not run custom code; the card shows the pipeline instead
        tags=["zsad", method_of(config), "anomaly-detection", "zero-shot", "clip", "industrial-inspection"],
        model_name=repo_id.split("/")[-1] if repo_id else title,
        eval_results=model_index_results(reports) or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=_template_text(method_of(config)),
        title=title,
        model_name=card_data.model_name,
        model_class=class_name,
        method=method_of(config),
        status=model_status,
        repo_id=repo_id or "ORG/NAME",
        backbone=base_model or config.base_model_name_or_path,
        backbone_revision=config.base_model_revision,
        image_size=config.image_size,
        backbone_on_hub=base_model is not None,
        training_dataset=training_dataset(config),
        training_categories=getattr(config, "training_categories", None),
        settings=config_settings(config),
        config=config,  # for method-specific sections (StackCLIP's clusters, GenCLIP's training losses)
        reports=reports,
        metric_name=metric_name,
        tiny_backbone=records_tiny_backbone(config),
    )


def _template_text(method: str) -> str:
    """Shared Jinja macros + the method's template (``from_template`` has no loader for ``{% import %}``)."""
    return "".join((TEMPLATE_DIR / name).read_text(encoding="utf-8") for name in (MACROS_TEMPLATE, f"{method}.md"))


# ----- checkpoints and publishing ---------------------------------------------------------------------------


def publishable_config(folder) -> PreTrainedConfig:
    """The config of a complete zsad checkpoint folder (config, weights, remote code); anything else is refused
    with a ZSADError."""
    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ZSADError(f"{folder} is not a zsad checkpoint: it has no {CONFIG_NAME}. Pass a folder written by save_pretrained or training.")
    model_type = read_json(config_file).get("model_type")
    try:
        checkpoint_config_class = config_class(str(model_type))
    except ZSADError as error:
        raise ZSADError(f"{folder} is not a zsad checkpoint: model_type is {model_type!r}. {error}") from error
    if not list(folder.glob("*.safetensors")):
        raise ZSADError(f"{folder} has no weights (model.safetensors). Save the model again with save_pretrained.")
    config = checkpoint_config_class.from_pretrained(folder)
    _check_remote_code(folder, config)
    return config


def _check_remote_code(folder: Path, config: PreTrainedConfig) -> None:
    """The files ``auto_map`` and ``custom_pipelines`` name, and their relative imports, must be there for
    ``trust_remote_code`` loading (``AutoModel`` and ``pipeline``)."""
    auto_map = getattr(config, "auto_map", None) or {}
    if not auto_map:
        raise ZSADError(f"{folder}/{CONFIG_NAME} has no auto_map, so the checkpoint cannot load with trust_remote_code. Save it again with zsad.")
    pipelines = getattr(config, "custom_pipelines", None) or {}
    if not pipelines:
        raise ZSADError(
            f"{folder}/{CONFIG_NAME} names no pipeline (custom_pipelines): it was saved by an older zsad. Save it again "
            f"with this one: zsad.load_model('{folder}').save_pretrained('{folder}')."
        )
    for reference in [*auto_map.values(), *(task["impl"] for task in pipelines.values())]:
        module_file = folder / f"{reference.split('.')[0]}.py"
        if not module_file.is_file():
            raise ZSADError(f"{folder} lacks {module_file.name}, named in {CONFIG_NAME}. Save the model again with zsad.")
        try:
            get_relative_import_files(str(module_file))  # reads every file the module imports, recursively
        except FileNotFoundError as error:
            raise ZSADError(
                f"{folder} lacks {Path(error.filename).name}, needed by {module_file.name}. Save the model again with zsad."
            ) from error


def checkpoint_files(folder) -> list[Path]:
    """The files of a checkpoint that go to the Hub (config, weights, code); README.md is replaced by the card."""
    folder = Path(folder)
    return sorted({path for pattern in CHECKPOINT_FILE_PATTERNS for path in folder.glob(pattern) if path.is_file()})


def write_publish_folder(checkpoint_or_model, directory, eval_json=None, repo_id: str | None = None, base_model: str | None = None,
                         tiny_backbone_for_tests: bool = False) -> tuple[Path, str]:
    """Write the folder ``publish`` would upload (dry run): weights, config, code and the full card; refused for the
    same reasons as ``publish``. Returns the folder and the line saying how the backbone was checked (offline, the
    Hub's config of the backbone id cannot be read unless it is cached)."""
    directory = Path(directory)
    card, source, config, backbone_check = _card_source_config(checkpoint_or_model, eval_json, repo_id, base_model,
                                                               tiny_backbone_for_tests)
    if isinstance(source, Path):
        directory.mkdir(parents=True, exist_ok=True)
        for path in checkpoint_files(source):
            shutil.copy2(path, directory / path.name)
        card.save(directory / "README.md")
        if base_model:
            config.to_json_file(directory / CONFIG_NAME)
    else:
        source.save_pretrained(directory, model_card=str(card))
    return directory, backbone_check


def publish(checkpoint_dir_or_model, repo_id: str, eval_json=None, token: str | None = None, private: bool | None = None,
            base_model: str | None = None, tiny_backbone_for_tests: bool = False):
    """One Hub commit with weights, config, code and the full model card; returns the ``CommitInfo``.

    ``checkpoint_dir_or_model`` is a zsad model or a checkpoint folder (published as is, without loading the CLIP).
    Its backbone must be known by a Hub id (``base_model`` names it for a local copy that does not record it) whose
    config on the Hub has the shape the checkpoint records; a checkpoint on the tiny random CLIP is refused unless
    ``tiny_backbone_for_tests`` (tests of publishing; the card then says its scores are noise). Evaluation results
    must be of these very weights on that backbone (``check_evaluation``).
    """
    _checked_repo_id(repo_id, "--repo-id")
    card, source, config, _ = _card_source_config(checkpoint_dir_or_model, eval_json, repo_id, base_model, tiny_backbone_for_tests)
    message = f"Upload {model_class(config.model_type).__name__} ({status(config)}) with zsad"
    try:
        if isinstance(source, Path):
            files = {path.name: path for path in checkpoint_files(source)} | {"README.md": str(card).encode("utf-8")}
            if base_model:
                files[CONFIG_NAME] = config.to_json_string().encode("utf-8")
            return commit_files(repo_id, files, message, token=token, private=private)
        return source.push_to_hub(repo_id, model_card=str(card), token=token, private=private, commit_message=message)
    except (HfHubHTTPError, OfflineModeIsEnabled) as error:
        raise ZSADError(
            f"Uploading to {repo_id} failed: {error}\nLog in with `hf auth login` (or pass a write token), check "
            "that you may write to that namespace, and unset HF_HUB_OFFLINE. `--dry-run DIR` works offline."
        ) from error


def _checked_repo_id(repo_id: str, option: str) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ZSADError(f"{option} must look like ORG/NAME: {error}") from error
    return repo_id


def _card_source_config(checkpoint_or_model, eval_json, repo_id, base_model: str | None, tiny_backbone_for_tests: bool):
    """(card, source, config, backbone check line) after every check; source is the checkpoint folder (a Path) or the
    model object."""
    if isinstance(checkpoint_or_model, (str, Path)):
        source = Path(checkpoint_or_model)
        config = publishable_config(source)
        digest = checkpoint_digest(source)
    elif hasattr(checkpoint_or_model, "save_pretrained") and hasattr(checkpoint_or_model, "config"):
        source, config, digest = checkpoint_or_model, checkpoint_or_model.config, model_digest(checkpoint_or_model)
    else:
        raise ZSADError(f"Expected a zsad model or a checkpoint folder, got {type(checkpoint_or_model).__name__}.")
    if base_model:
        config.base_model_hub_id = _checked_repo_id(base_model, "--base-model")
    _require_hub_backbone(config, source, repo_id)
    _refuse_tiny_backbone(config, tiny_backbone_for_tests)
    backbone_check = check_hub_backbone(config)
    for report in load_evaluation(eval_json) if eval_json is not None else []:
        check_evaluation(report, config, digest)
    return render_model_card(config, eval_json, repo_id), source, config, backbone_check


def _refuse_tiny_backbone(config: PreTrainedConfig, tiny_backbone_for_tests: bool) -> None:
    if records_tiny_backbone(config) and not tiny_backbone_for_tests:
        raise ZSADError(
            "This checkpoint was built on the tiny random CLIP (zsad tiny-clip / --tiny): its scores are noise, so it is "
            "not published. Build or train it on a real CLIP (e.g. --clip openai/clip-vit-large-patch14-336). Tests of "
            "publishing itself pass --tiny-backbone-for-tests, and the card then says its scores are noise."
        )


def check_hub_backbone(config: PreTrainedConfig) -> str:
    """Compare the backbone shape the checkpoint records with the config of its backbone's Hub id; a mismatch or an
    id that is no CLIP on the Hub is refused. Returns the line saying what was checked, or why it could not be (offline,
    with the config not in the local cache)."""
    hub_id, revision = config.backbone_hub_id, config.base_model_revision
    try:
        config_file = hf_hub_download(hub_id, CONFIG_NAME, revision=revision)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        return f"Could not check the backbone {hub_id} against its config on the Hub (offline: {type(error).__name__}); " \
               f"the checkpoint records {_shape_text(recorded_shape(config))}."
    except (EntryNotFoundError, HfHubHTTPError) as error:
        raise ZSADError(f"The backbone {hub_id} has no readable {CONFIG_NAME} on the Hub ({error}). Name the Hub id of the "
                        "CLIP the checkpoint was built on: --base-model ORG/NAME.") from error
    hub_config = read_json(config_file)
    if hub_config.get("model_type") != "clip":
        raise ZSADError(f"The backbone {hub_id} is a {hub_config.get('model_type')!r} model on the Hub, not a CLIP. Name the "
                        "Hub id of the CLIP the checkpoint was built on: --base-model ORG/NAME.")
    try:
        on_hub = clip_config_shape(CLIPConfig.from_dict(hub_config))
    except (ValueError, TypeError) as error:
        raise ZSADError(f"The config of the backbone {hub_id} on the Hub is not a valid CLIP config ({error}).") from error
    recorded = recorded_shape(config)
    if recorded != on_hub:
        raise ZSADError(
            f"The checkpoint was built on a CLIP with {_shape_text(recorded)}, but {hub_id} on the Hub has "
            f"{_shape_text(on_hub)}: the card would describe another backbone. Name the Hub id of the CLIP it was built "
            "on: --base-model ORG/NAME."
        )
    return f"Checked: {hub_id} on the Hub has the backbone shape the checkpoint records ({_shape_text(recorded)})."


def _shape_text(shape: dict) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in shape.items())


def _require_hub_backbone(config: PreTrainedConfig, source, repo_id: str | None) -> None:
    """A published model loads its backbone from the Hub: a backbone known only as a local path is refused."""
    if config.backbone_hub_id is not None:
        return
    checkpoint = source if isinstance(source, Path) else "CHECKPOINT"
    raise ZSADError(
        f"The backbone of this model is known only as the local path {config.base_model_name_or_path}, which other "
        f"machines do not have, so the published model would not load there. Name the Hub id that copy was "
        f"downloaded from: zsad publish {checkpoint} --repo-id {repo_id or 'ORG/NAME'} --base-model ORG/NAME "
        "(e.g. openai/clip-vit-large-patch14-336), or train with --base-model ORG/NAME."
    )


__all__ = ["publish", "render_model_card", "write_publish_folder"]
