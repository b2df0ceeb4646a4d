"""The paper protocol: per-category image and pixel metrics of a model on a benchmark, and their mean.

```python
>>> from zsad.evaluation.protocol import evaluate, write_outputs
>>> report, records = evaluate("baseline", "visa", "/data/visa", clip="openai/clip-vit-large-patch14-336")
>>> report["mean"]["pixel_aupro"]
>>> write_outputs(report, records, "results/")   # evaluation.json, evaluation.md, evaluation.png
```

or ``zsad evaluate --model baseline --dataset visa --root /data/visa --out results/``, or on several
processes / GPUs ``accelerate launch train/evaluate.py --model ... --dataset ... --root ... --out ...``:
each process scores a shard of the images, the main process gathers the results and writes the outputs.

Memory: maps are kept at the model's input size in float16 (518 x 518 x 2 bytes = 0.5 MB per image, 1.2 GB
for VisA's 2,162 test images); at metric time they are resized (bilinear) to each mask's native size one
category at a time. float16 also lets ``zsad.metrics`` rank scores in O(N) (its exactness is for the stored
float16 values; their 11-bit mantissa resolves scores to ~5e-4 near 1).
"""

import json
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import Sample, load_dataset, read_mask
from ..data.model_input import ImageSet
from ..data.synthetic import is_synthetic
from ..detection.detector import AnomalyDetector
from ..detection.fusion import scored
from ..detection.mutual import MutualSettings, detect_mutual_groups, lot_groups, lot_keys
from ..detection.references import FusionScale
from ..detection.visualize import evaluation_figure, few_shot_figure
from ..metrics import METRICS, PIXEL_METRICS, Curves, ThresholdCurve, image_curves, image_metrics, metric_name, pixel_metrics
from ..modeling.exceptions import ZSADError
from ..modeling.image_processing_zsad import resize_map
from ..modeling.prompting import clean_class_name
from ..runtime.atomic import write_text_atomic
from ..runtime.engine import model_features, model_route
from ..runtime.engine_choice import vision_engine
from ..runtime.images import load_image
from ..runtime.loading import Runtime, load_model, runtime_backbone
from ..runtime.methods import METHODS
from ..runtime.noise import bar_disable
from ..runtime.provenance import model_record, provenance

NUM_EXAMPLES = 3  # per row of the figure: best detections, missed defects, false alarms
OUTPUT_NAMES = {"json": "evaluation.json", "markdown": "evaluation.md", "figure": "evaluation.png"}
FEW_SHOT_FIGURE = "evaluation_shots.png"
MUTUAL_MARK = ", mutual: each category's test images scored against each other"


@dataclass
class Record:
    """One scored test image: its sample, image score and float16 map at the model's input size."""

    sample: Sample
    score: float
    anomaly_map: np.ndarray


def evaluate(model, dataset: str, root=None, categories=None, clip: str | None = None, image_size: int | None = None,
             batch_size: int = 8, num_workers: int = 0, accelerator: Accelerator | None = None,
             precision: str = "auto", normal_dirs=(), columns: dict[str, str | None] | None = None,
             tiles: bool = False, device: str | None = None, mutual: bool = False,
             mutual_settings: MutualSettings = MutualSettings(), engine: str | None = None) -> tuple[dict, list[Record]]:
    """Score every test image of ``dataset`` (a layout read from ``root``, or ``hf:ORG/NAME[:split]`` /
    ``hf-disk:PATH``, see ``zsad.data.load_dataset``) with ``model`` (a loaded model, method name or checkpoint) and
    return the report ``{"dataset", "model", "image_size", "categories": {cat: metrics}, "mean": metrics}``
    and the records (on the main process; other processes get ``({}, [])``). ``device`` and ``precision`` are
    as ``zsad.runtime.loading.Runtime.resolve`` takes them (default: the accelerator's device, auto precision);
    ``engine`` runs the vision pass as in ``AnomalyDetector.load`` (default ``$ZSAD_ENGINE``, else auto).

    ``tiles`` scores each image at full resolution in overlapping windows of the input size
    (``AnomalyDetector.detect_tiled``, ``batch_size`` windows at a time); the blended map is then kept at the input
    size like every other map. ``mutual`` scores each category's test images against each other, unlabeled, group by
    group (``zsad.detection.mutual.detect_mutual_groups`` with ``mutual_settings``, no labels used); the report says
    ``"mutual": true``."""
    accelerator = accelerator or Accelerator()
    with accelerator.main_process_first():  # a Hugging Face dataset's images are written once, by the main process
        samples = load_dataset(dataset, root, categories=categories, normal_dirs=normal_dirs, columns=columns)
    if not samples:
        raise ZSADError(f"No test images found for '{dataset}' in {root}.")
    model_name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
    if mutual and tiles:
        raise ZSADError("--mutual and --tiles cannot be combined; mutual scoring compares whole images.")
    runtime = evaluation_runtime(accelerator, device, precision)
    loaded_here = isinstance(model, str)  # a model passed in keeps its precision, so auto keeps its weights as they are
    model = evaluation_model(model, clip, image_size, runtime).to(runtime.device)
    score = partial(_score_mutual, settings=mutual_settings) if mutual else _score_tiled if tiles else score_samples
    detector = evaluation_detector(model, engine, quantised=runtime.precision_chosen and loaded_here)
    records = score(detector, samples, batch_size, num_workers, accelerator)
    if not accelerator.is_main_process:
        return {}, []
    report = {"dataset": dataset, "root": str(Path(root).resolve()) if root is not None else None,
              "synthetic": is_synthetic(root), "model": model_name, "evaluated_model": model_record(model, model_name),
              "provenance": provenance(model, name_or_path=model_name, threshold_rule=EVALUATION_THRESHOLD_RULE,
                                       vision_engine=model_route(detector.engine, model)),
              "image_size": model.config.image_size, "tiles": tiles, **({"mutual": True} if mutual else {}),
              "num_images": len(records), "num_processes": accelerator.num_processes, **category_report(records)}
    return report, records


# The metrics sweep every threshold: no verdict, so no threshold, is part of an evaluation.
EVALUATION_THRESHOLD_RULE = (None, None, "none: threshold-free metrics (AUROC, AP, F1-max, AUPRO)")


def evaluation_runtime(accelerator: Accelerator, device: str | None, precision: str) -> Runtime:
    """Under ``accelerate launch`` each process runs on its own device; else ``device`` (default the accelerator's)."""
    return Runtime.resolve(accelerator.device if device is None or accelerator.num_processes > 1 else device, precision)


def evaluation_model(model, clip: str | None, image_size: int | None, runtime: Runtime):
    if not isinstance(model, str):
        return model.eval()
    overrides = {"image_size": image_size} if image_size and model in METHODS else {}
    backbone = runtime_backbone(clip, None, runtime) if clip else None
    return load_model(model, backbone=backbone, clip=clip, precision=runtime.precision, device=runtime.device, **overrides).eval()


def evaluation_detector(model, engine: str | None, quantised: bool = False) -> AnomalyDetector:
    """``model`` (held as "model") on its backbone, its vision pass run by ``engine`` (``zsad.runtime.engine_choice``;
    ``quantised``: auto may run it on an int8 graph)."""
    backbone = model.require_backbone()
    return AnomalyDetector(backbone, {"model": model}, engine=vision_engine(backbone, engine, quantised=quantised))


def score_samples(detector: AnomalyDetector, samples: list[Sample], batch_size: int, num_workers: int, accelerator: Accelerator,
                  memory=None, scale: FusionScale | None = None, label: str = "evaluating zero-shot") -> list[Record]:
    model, device = detector.model("model"), detector.backbone.device
    with accelerator.split_between_processes(list(range(len(samples)))) as shard:
        dataset = ImageSet([samples[i] for i in shard], model.image_processor)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        local = []
        with torch.inference_mode():
            for batch in tqdm(loader, desc=label, disable=bar_disable(accelerator.is_local_main_process)):
                pixel_values, positions = batch["pixel_values"], batch["index"]
                names = [clean_class_name(dataset.samples[p].category) for p in positions.tolist()]
                features = model_features(detector.engine, model, pixel_values.to(device))
                output, fused = scored(model, features, names, memory, scale)  # few-shot: fused with the references
                result = fused or output
                maps = result.anomaly_map.float().cpu().numpy().astype(np.float16)
                local += [(shard[p], float(s), m) for p, s, m in zip(positions.tolist(), result.image_score.float().cpu(), maps)]
    return _gathered(local, samples, accelerator)


def _score_tiled(detector: AnomalyDetector, samples: list[Sample], batch_size: int, num_workers: int,
                 accelerator: Accelerator) -> list[Record]:
    size = detector.model("model").config.image_size
    with accelerator.split_between_processes(list(range(len(samples)))) as shard:
        local = []
        for index in tqdm(shard, desc="evaluating in tiles", disable=bar_disable(accelerator.is_local_main_process)):
            result = detector.detect_tiled(samples[index].image_path, clean_class_name(samples[index].category), batch_size=batch_size)
            local.append((index, result.score, native_map(result.anomaly_map, (size, size))))
    return _gathered(local, samples, accelerator)


def _score_mutual(detector: AnomalyDetector, samples: list[Sample], batch_size: int, num_workers: int, accelerator: Accelerator,
                  settings: MutualSettings) -> list[Record]:
    """Each category's test images scored against each other group by group (groups fixed from the files' bytes);
    processes share whole groups, and only each image's score and float16 map are kept."""
    lots = {}
    for category in sorted({sample.category for sample in samples}):
        indices = [i for i, sample in enumerate(samples) if sample.category == category]
        paths = [samples[i].image_path for i in indices]
        keys = lot_keys(paths)
        lots[category] = (indices, paths, keys, lot_groups(keys, settings, [str(path) for path in paths]))
    work = [(category, group) for category, (*_, groups) in lots.items() for group in groups]
    with accelerator.split_between_processes(work) as shard:
        local = []
        for category, group in tqdm(shard, desc="evaluating (mutual)", unit="group", disable=bar_disable(accelerator.is_local_main_process)):
            indices, paths, keys, _ = lots[category]
            for scored in detect_mutual_groups(detector, paths, category, method="model", settings=settings, batch_size=batch_size,
                                               keys=keys, groups=[group]):
                local += [(indices[i], result.score, result.model_map.astype(np.float16)) for i, result in zip(scored.indices, scored.outcomes)]
    return _gathered(local, samples, accelerator)


def _gathered(local: list[tuple], samples: list[Sample], accelerator: Accelerator) -> list[Record]:
    """Every process's (index, score, map) as records in sample order."""
    gathered = sorted(gather_object(local), key=lambda item: item[0]) if accelerator.num_processes > 1 else local
    return [Record(samples[index], score, anomaly_map) for index, score, anomaly_map in gathered]


def by_category_samples(samples: list[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.category, []).append(sample)
    return dict(sorted(groups.items()))


def category_report(records: list[Record]) -> dict:
    """``{"categories": {cat: {metric: value}}, "mean": {metric: mean over categories}}`` (NaN -> None), and
    ``"notes": {cat: why its pixel metrics are missing}`` when defective images lack masks."""
    groups = by_category(records)
    categories = {name: category_metrics(group) for name, group in groups.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of a metric NaN in every category
        mean = {key: float(np.nanmean([m[key] for m in categories.values()])) for key in METRICS}
    report = {"categories": {name: json_values(m) for name, m in categories.items()}, "mean": json_values(mean)}
    notes = {name: note for name, group in groups.items() if (note := missing_masks_note(group))}
    if notes:
        report["notes"] = notes
    return report


def by_category(records: list[Record]) -> dict[str, list[Record]]:
    """Records grouped by category, categories sorted by name."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.sample.category, []).append(record)
    return dict(sorted(groups.items()))


def category_metrics(records: list[Record]) -> dict[str, float]:
    """The seven metrics of one category; pixel metrics are NaN when a defective image has no mask."""
    metrics = image_metrics([r.sample.label for r in records], [r.score for r in records])
    if not has_masks(records):
        return {**metrics, **dict.fromkeys(PIXEL_METRICS, float("nan"))}
    return {**metrics, **pixel_metrics(*masks_and_native_maps(records))}


def has_masks(records: list[Record]) -> bool:
    """Whether every defective image has a ground-truth mask (the pixel metrics and curves need them)."""
    return not any(r.sample.label and r.sample.mask_path is None for r in records)


def missing_masks_note(records: list[Record]) -> str | None:
    """Why a category has no pixel metrics ("pixel metrics not available (no masks)"), or None if it has them."""
    defective = [r for r in records if r.sample.label]
    missing = sum(r.sample.mask_path is None for r in defective)
    if not missing:
        return None
    which = "no masks" if missing == len(defective) else f"{missing} of {len(defective)} defective images have no mask"
    return f"pixel metrics not available ({which})"


def masks_and_native_maps(records: list[Record]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each record's mask and its map resized to the mask's native size (float16)."""
    masks = [read_mask(r.sample) for r in records]
    return masks, [native_map(r.anomaly_map, mask.shape) for r, mask in zip(records, masks)]


def native_map(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(S, S) map resized (bilinear, as every map in zsad) to a mask's (H, W), as float16."""
    return resize_map(anomaly_map, (shape[1], shape[0])).astype(np.float16)


def json_values(metrics: dict[str, float]) -> dict[str, float | None]:
    return {key: None if np.isnan(value) else value for key, value in metrics.items()}


def markdown_table(report: dict) -> str:
    """Per-category and mean metrics in percent with one decimal; n/a where a category has no masks."""
    notes = report.get("notes", {})
    header = "| Category | " + " | ".join(metric_name(key, short=True) for key in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    rows = [_row(name, metrics, name in notes) for name, metrics in report["categories"].items()]
    mark = MUTUAL_MARK if report.get("mutual") else ""
    lines = [f"## {report['dataset']} ({report.get('model', '')}{mark})", "", header, rule, *rows, _row("**mean**", report["mean"]), ""]
    if notes:
        lines += [f"n/a: {name}: {note}; the mean's pixel metrics leave it out." for name, note in notes.items()] + [""]
    return "\n".join(lines)


def _row(name: str, metrics: dict, no_masks: bool = False) -> str:
    missing = "n/a" if no_masks else "—"
    cells = [(missing if key in PIXEL_METRICS else "—") if metrics.get(key) is None else f"{100 * metrics[key]:.1f}"
             for key in METRICS]
    return f"| {name} | " + " | ".join(cells) + " |"


def write_outputs(report: dict, records: list[Record], out_dir) -> dict[str, Path]:
    """Write evaluation.json, evaluation.md and evaluation.png (image and pixel curves, examples) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / name for kind, name in OUTPUT_NAMES.items()}
    write_text_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    write_text_atomic(paths["markdown"], markdown_table(report) + (few_shot_table(report) if "few_shot" in report else ""))
    notes = report.get("notes", {})
    level_notes = {"Pixel": "; ".join(f"{name}: {note}" for name, note in notes.items())} if notes else {}
    if report.get("mutual"):
        level_notes = {level: "; ".join(filter(None, [MUTUAL_MARK.strip(", "), level_notes.get(level)])) for level in ("Image", "Pixel")}
    evaluation_figure(example_rows(records), figure_curves(records), paths["figure"], notes=level_notes or None)
    if "few_shot" in report:
        paths["few_shot_figure"] = out_dir / FEW_SHOT_FIGURE
        few_shot_figure(report["mean"], report["few_shot"], paths["few_shot_figure"])
    return paths


def example_rows(records: list[Record], count: int = NUM_EXAMPLES) -> dict[str, list[tuple]]:
    """(title, image, native map, mask) of the best-found defects, the most-missed defects and the worst false alarms."""
    defective = sorted((r for r in records if r.sample.label), key=lambda r: r.score)
    normal = sorted((r for r in records if not r.sample.label), key=lambda r: r.score)
    rows = {"best detections": defective[::-1][:count], "missed defects": defective[:count], "false alarms": normal[::-1][:count]}
    return {title: [_example(r) for r in chosen] for title, chosen in rows.items()}


def _example(record: Record) -> tuple:
    image = load_image(record.sample.image_path)
    mask = read_mask(record.sample)
    if mask.shape != (image.height, image.width):
        mask = np.zeros((image.height, image.width), dtype=bool)  # mask of another size: shown without its contour
    anomaly_map = native_map(record.anomaly_map, (image.height, image.width)).astype(np.float32)
    title = f"{record.sample.category}/{record.sample.defect_type} {record.score:.3f}"
    return title, image, anomaly_map, mask


def figure_curves(records: list[Record]) -> dict[str, dict[str, Curves]]:
    """Image and pixel ROC / PR curves per category (a category with one class only, or with defective images
    without masks, is left out of that level). Pixel curves are exact and built one category at a time, like
    the pixel metrics, so only one category's native-size maps exist at once."""
    levels = {"Image": {}, "Pixel": {}}
    for name, group in by_category(records).items():
        levels["Image"][name] = image_curves([r.sample.label for r in group], [r.score for r in group])
        levels["Pixel"][name] = pixel_curves(group)
    return {level: {name: curve for name, curve in curves.items() if curve is not None} for level, curves in levels.items()}


def pixel_curves(records: list[Record]) -> Curves | None:
    """Exact pixel ROC / PR points of one category at native mask size; None without masks or with one class."""
    if not has_masks(records):
        return None
    return ThresholdCurve.from_maps(*masks_and_native_maps(records)).curves()


def few_shot_table(report: dict) -> str:
    """Markdown: zero-shot and K-shot (mean ± std over seeds) per category and on average, in percent."""
    few = report["few_shot"]
    header = "| Category | setting | " + " | ".join(metric_name(key, short=True) for key in METRICS) + " |"
    lines = [f"## {few['shots']}-shot, {len(few['seeds'])} seeds (mean ± std) against zero-shot", "", header,
             "|---|---|" + "---:|" * len(METRICS)]
    rows = [(name, report["categories"][name], few["categories"][name]) for name in few["categories"]]
    for name, zero, shot in rows + [("**mean**", report["mean"], {"mean": few["mean"], "std": few["std"]})]:
        lines.append(_row(f"{name} | zero-shot", zero))
        cells = ["—" if shot["mean"][key] is None else f"{100 * shot['mean'][key]:.1f} ± {100 * shot['std'][key]:.1f}" for key in METRICS]
        lines.append(f"| {name} | {few['shots']}-shot | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])
