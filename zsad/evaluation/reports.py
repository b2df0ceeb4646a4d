"""Evaluation results for model cards: reading what ``zsad evaluate`` wrote, checking that it belongs on a card, and
turning it into ``model-index`` entries.

Evaluation JSON accepted by ``load_evaluation`` (as written by ``zsad evaluate``): one report or a list of reports,
or ``{"reports": [...]}``; a report is ::

    {"dataset": "VisA",                      # required (also accepted: "dataset_name")
     "dataset_id": "visa", "split": "test",  # optional
     "categories": {"pcb1": {"image_auroc": 0.91, "pixel_aupro": 0.85, ...}, ...},
     "mean": {"image_auroc": 0.88, ...},     # optional: computed from "categories" when missing
     "evaluated_model": {...},               # which model was evaluated (zsad.runtime.provenance.model_record)
     "provenance": {...}}                    # what made the results, its backbone's shape among it (zsad.runtime.provenance)

``publish`` and ``export`` take results only for the checkpoint they publish (same adapter digest, on a backbone of
the shape it records), never for the untrained method, and never measured on the model's own training categories (``check_evaluation``).

Metric values are fractions in [0, 1] or percentages; they go into ``model-index`` exactly as written.
``null``/NaN values (e.g. pixel metrics of an image-level-only dataset) are left out.
"""

import dataclasses
import json
import math
import re
from pathlib import Path

from huggingface_hub import EvalResult
from transformers import PreTrainedConfig

from ..metrics import metric_name
from ..modeling.exceptions import ZSADError
from ..runtime.methods import status
from ..runtime.provenance import recorded_shape

IMAGE_TASK = {"task_type": "image-classification", "task_name": "Zero-shot anomaly detection (image level)"}
PIXEL_TASK = {"task_type": "image-segmentation", "task_name": "Zero-shot anomaly segmentation (pixel level)"}


@dataclasses.dataclass
class EvaluationReport:
    """One evaluated dataset: mean and per-category metrics, as written in the evaluation JSON."""

    dataset: str
    dataset_id: str
    split: str
    mean: dict[str, float]
    categories: dict[str, dict[str, float]]
    evaluated_model: dict | None = None
    synthetic: bool = False
    provenance: dict | None = None

    @property
    def label(self) -> str:
        """What the results were measured on, as the card's heading says it: "test split", or synthetic data."""
        return "synthetic images in its layout, not the benchmark" if self.synthetic else f"{self.split} split"

    @property
    def is_percent(self) -> bool:
        values = [*self.mean.values(), *(v for metrics in self.categories.values() for v in metrics.values())]
        return any(value > 1.0 for value in values)

    def display(self, value: float | None) -> str:
        if value is None:
            return "–"
        return f"{value if self.is_percent else 100.0 * value:.1f}"


def load_evaluation(source) -> list[EvaluationReport]:
    """Reports from an evaluation JSON path, a report dict, or a list of them (schema in the module docstring)."""
    data = read_json(source) if isinstance(source, (str, Path)) else source
    if isinstance(data, dict) and "reports" in data:
        data = data["reports"]
    raw_reports = data if isinstance(data, list) else [data]
    if not raw_reports or not all(isinstance(raw, dict) for raw in raw_reports):
        raise ZSADError(f"Evaluation results must be a report object or a list of them, got: {str(data)[:200]}")
    return [_parse_report(raw) for raw in raw_reports]


def read_json(path) -> dict | list:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ZSADError(f"File not found: {path}. Evaluation results are written by `zsad evaluate`.") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ZSADError(f"{path} is not valid JSON: {error}") from error


def _parse_report(raw: dict) -> EvaluationReport:
    dataset = raw.get("dataset") or raw.get("dataset_name")
    if not isinstance(dataset, str) or not dataset.strip():
        raise ZSADError(f"An evaluation report has no dataset name ('dataset'); its keys are {sorted(raw)}.")
    categories = {str(name): _clean_metrics(metrics, f"{dataset}/{name}") for name, metrics in (raw.get("categories") or {}).items()}
    mean = _clean_metrics(raw["mean"], f"{dataset}/mean") if raw.get("mean") else _mean_over_categories(categories)
    if not mean:
        raise ZSADError(f"The evaluation report for {dataset} holds no metric values ('mean' or 'categories').")
    dataset_id = raw.get("dataset_id") or re.sub(r"[^a-z0-9]+", "_", dataset.lower()).strip("_")
    synthetic = raw.get("synthetic", False) is True
    split = "synthetic" if synthetic else raw.get("split") or "test"
    return EvaluationReport(dataset, dataset_id, split, mean, categories, raw.get("evaluated_model"), synthetic,
                            raw.get("provenance"))


def _clean_metrics(metrics, where: str) -> dict[str, float]:
    """Numeric metric values; null/NaN entries are dropped, anything else non-numeric is an error."""
    if not isinstance(metrics, dict):
        raise ZSADError(f"Metrics of {where} must be an object {{metric: value}}, got {metrics!r}.")
    cleaned = {}
    for key, value in metrics.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ZSADError(f"Metric {key} of {where} must be a number, got {value!r}.")
        cleaned[key] = value
    return cleaned


def _mean_over_categories(categories: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per-metric mean over the categories that have the metric (the paper protocol: per category, then averaged)."""
    keys = dict.fromkeys(key for metrics in categories.values() for key in metrics)
    return {key: sum(values) / len(values) for key in keys if (values := [m[key] for m in categories.values() if key in m])}


def model_index_results(reports: list[EvaluationReport]) -> list[EvalResult]:
    """One ``model-index`` entry per (dataset, metric), with the mean value exactly as written."""
    return [
        EvalResult(
            **(PIXEL_TASK if key.startswith("pixel_") else IMAGE_TASK),
            dataset_type=report.dataset_id,
            dataset_name=report.dataset,
            dataset_split=report.split,
            metric_type=key,
            metric_name=metric_name(key),
            metric_value=value,
        )
        for report in reports
        for key, value in report.mean.items()
    ]


def training_dataset(config: PreTrainedConfig) -> str | None:
    """The auxiliary training dataset's name from the training metadata, or what a converted checkpoint's authors
    trained it on (None when the config records neither)."""
    return getattr(config, "training_dataset", None) or getattr(config, "trained_on", None)


def check_evaluation(report: EvaluationReport, config: PreTrainedConfig, digest: str | None = None) -> None:
    """Refuse (ZSADError, with the reason) results that do not belong on this model's card: those of another method
    or of the untrained one, those measured on its own training categories, and, when ``digest`` (the published
    adapters' ``zsad.runtime.provenance`` digest) is given, those of other weights, of an unrecorded model, or made on another
    backbone than the one the config records."""
    where = f"The evaluation on {report.dataset}"
    evaluated = report.evaluated_model
    if evaluated is not None and evaluated.get("model_type") != config.model_type:
        raise ZSADError(f"{where} is of a {evaluated.get('model_type')} model ({evaluated.get('name_or_path')}), not of "
                        f"this {config.model_type} model. Evaluate this checkpoint: zsad evaluate --model CHECKPOINT ...")
    if evaluated is not None and evaluated.get("status") == "untrained" and status(config) == "trained":
        raise ZSADError(f"{where} is of the untrained {evaluated.get('name_or_path')} (training-free start), not of this "
                        "trained checkpoint. Evaluate the checkpoint itself: zsad evaluate --model CHECKPOINT ...")
    seen = _training_categories_in(report, config)
    if seen:
        raise ZSADError(f"{where} was made on the model's own training data ({training_dataset(config)}: {', '.join(seen)}), "
                        "so its numbers are not zero-shot results. Publish results on datasets (or categories) it was "
                        "not trained on.")
    if digest is None:
        return
    if evaluated is None:
        raise ZSADError(f"{where} does not say which model it evaluated (written by an older zsad evaluate, or by "
                        "hand). Evaluate the checkpoint with `zsad evaluate --model CHECKPOINT ...` and publish that.")
    if evaluated.get("adapter_digest") != digest:
        raise ZSADError(f"{where} is of another model: {evaluated.get('name_or_path')} with weights "
                        f"{str(evaluated.get('adapter_digest'))[:19]}..., while the published weights are {digest[:19]}... "
                        "Evaluate the checkpoint you publish: zsad evaluate --model CHECKPOINT ...")
    _check_evaluated_backbone(report, config)


def _check_evaluated_backbone(report: EvaluationReport, config: PreTrainedConfig) -> None:
    """The report's provenance must name a backbone of the shape the checkpoint records (same depth, widths, patch)."""
    where = f"The evaluation on {report.dataset}"
    backbone = (report.provenance or {}).get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("shape"), dict):
        raise ZSADError(f"{where} does not say which backbone made it (no provenance block: written by an older zsad "
                        "evaluate). Evaluate the checkpoint again: zsad evaluate --model CHECKPOINT ...")
    recorded = recorded_shape(config)
    evaluated = {key: backbone["shape"].get(key) for key in recorded}
    if evaluated != recorded:
        raise ZSADError(f"{where} was made on another backbone ({backbone.get('hub_id') or backbone.get('name_or_path')}: "
                        f"{evaluated}) than the checkpoint's ({config.backbone_hub_id or config.base_model_name_or_path}: "
                        f"{recorded}). Evaluate the checkpoint on its own backbone: zsad evaluate --model CHECKPOINT ...")


def _training_categories_in(report: EvaluationReport, config: PreTrainedConfig) -> list[str]:
    """The report's categories the model was trained on: all of them when the dataset is the training dataset and
    the config does not list the training categories."""
    trained_on = training_dataset(config)
    if not trained_on or _dataset_key(trained_on) not in {_dataset_key(report.dataset), _dataset_key(report.dataset_id)}:
        return []
    categories = getattr(config, "training_categories", None)
    evaluated = sorted(report.categories) or [report.dataset]
    return evaluated if categories is None else [name for name in evaluated if name in categories]


def _dataset_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower())
