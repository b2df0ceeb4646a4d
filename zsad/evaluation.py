"""The paper protocol: per-category image and pixel metrics of a model on a benchmark, and their mean.

```python
>>> from zsad.evaluation import evaluate, write_outputs
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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import Sample, load_dataset, read_mask
from .data.model_input import ImageSet
from .distributed import process_group_closed_at_end
from .errors import ZSADError
from .images import load_image
from .inference import AnomalyDetector
from .loading import PRECISIONS, load_backbone, load_model, resolve_precision
from .methods import METHODS
from .metrics import METRICS, PIXEL_METRICS, Curves, ThresholdCurve, image_curves, image_metrics, metric_name, pixel_metrics
from .modeling.prompting import clean_class_name
from .visualize import evaluation_figure

NUM_EXAMPLES = 3  # per row of the figure: best detections, missed defects, false alarms
OUTPUT_NAMES = {"json": "evaluation.json", "markdown": "evaluation.md", "figure": "evaluation.png"}


@dataclass
class Record:
    """One scored test image: its sample, image score and float16 map at the model's input size."""

    sample: Sample
    score: float
    anomaly_map: np.ndarray


def evaluate(model, dataset: str, root, categories=None, clip: str | None = None, image_size: int | None = None,
             batch_size: int = 8, num_workers: int = 0, accelerator: Accelerator | None = None,
             precision: str = "float32", tiles: bool = False) -> tuple[dict, list[Record]]:
    """Score every test image of ``dataset`` with ``model`` (a loaded model, method name or checkpoint) and
    return the report ``{"dataset", "model", "image_size", "categories": {cat: metrics}, "mean": metrics}``
    and the records (on the main process; other processes get ``({}, [])``).

    ``tiles`` scores each image at full resolution in overlapping windows of the input size
    (``AnomalyDetector.detect_tiled``, ``batch_size`` windows at a time); the blended map is then kept at the input
    size like every other map."""
    accelerator = accelerator or Accelerator()
    samples = load_dataset(dataset, root, categories=categories)
    if not samples:
        raise ZSADError(f"No test images found for '{dataset}' in {root}.")
    model_name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
    model = _load(model, clip, image_size, resolve_precision(precision, accelerator.device)).to(accelerator.device)
    score = _score_tiled if tiles else _score
    records = score(model, samples, batch_size, num_workers, accelerator)
    if not accelerator.is_main_process:
        return {}, []
    report = {"dataset": dataset, "model": model_name, "image_size": model.config.image_size, "tiles": tiles,
              "num_images": len(records), "num_processes": accelerator.num_processes, **category_report(records)}
    return report, records


def _load(model, clip: str | None, image_size: int | None, dtype):
    if not isinstance(model, str):
        return model.eval()
    overrides = {"image_size": image_size} if image_size and model in METHODS else {}
    backbone = load_backbone(clip, dtype=dtype) if clip else None
    return load_model(model, backbone=backbone, clip=clip, dtype=dtype, **overrides).eval()


def _score(model, samples: list[Sample], batch_size: int, num_workers: int, accelerator: Accelerator) -> list[Record]:
    backbone = model.require_backbone()
    with accelerator.split_between_processes(list(range(len(samples)))) as shard:
        dataset = ImageSet([samples[i] for i in shard], model.config.image_size, backbone.image_mean, backbone.image_std)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        local = []
        with torch.inference_mode():
            for batch in tqdm(loader, desc="evaluating", disable=not accelerator.is_local_main_process):
                pixel_values, positions = batch["pixel_values"], batch["index"]
                names = [clean_class_name(dataset.samples[p].category) for p in positions.tolist()]
                output = model(pixel_values.to(accelerator.device), class_names=names)
                maps = output.anomaly_map.float().cpu().numpy().astype(np.float16)
                local += [(shard[p], float(s), m) for p, s, m in zip(positions.tolist(), output.image_score.float().cpu(), maps)]
    return _gathered(local, samples, accelerator)


def _score_tiled(model, samples: list[Sample], batch_size: int, num_workers: int, accelerator: Accelerator) -> list[Record]:
    detector = AnomalyDetector(model.require_backbone(), {"model": model})
    size = model.config.image_size
    with accelerator.split_between_processes(list(range(len(samples)))) as shard:
        local = []
        for index in tqdm(shard, desc="evaluating (tiles)", disable=not accelerator.is_local_main_process):
            result = detector.detect_tiled(samples[index].image_path, clean_class_name(samples[index].category), batch_size=batch_size)
            local.append((index, result.score, native_map(result.anomaly_map, (size, size))))
    return _gathered(local, samples, accelerator)


def _gathered(local: list[tuple], samples: list[Sample], accelerator: Accelerator) -> list[Record]:
    """Every process's (index, score, map) as records in sample order."""
    gathered = sorted(gather_object(local), key=lambda item: item[0]) if accelerator.num_processes > 1 else local
    return [Record(samples[index], score, anomaly_map) for index, score, anomaly_map in gathered]


def category_report(records: list[Record]) -> dict:
    """``{"categories": {cat: {metric: value}}, "mean": {metric: mean over categories}}`` (NaN -> None)."""
    categories = {name: category_metrics(group) for name, group in by_category(records).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of a metric NaN in every category
        mean = {key: float(np.nanmean([m[key] for m in categories.values()])) for key in METRICS}
    return {"categories": {name: _json_values(m) for name, m in categories.items()}, "mean": _json_values(mean)}


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
        warnings.warn(f"Category {records[0].sample.category}: defective images without masks; pixel metrics are NaN.",
                      RuntimeWarning, stacklevel=2)
        return {**metrics, **dict.fromkeys(PIXEL_METRICS, float("nan"))}
    return {**metrics, **pixel_metrics(*masks_and_native_maps(records))}


def has_masks(records: list[Record]) -> bool:
    """Whether every defective image has a ground-truth mask (the pixel metrics and curves need them)."""
    return not any(r.sample.label and r.sample.mask_path is None for r in records)


def masks_and_native_maps(records: list[Record]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each record's mask and its map resized to the mask's native size (float16)."""
    masks = [read_mask(r.sample) for r in records]
    return masks, [native_map(r.anomaly_map, mask.shape) for r, mask in zip(records, masks)]


def native_map(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(S, S) map resized (bilinear) to a mask's (H, W), as float16."""
    tensor = torch.from_numpy(anomaly_map.astype(np.float32))[None, None]
    resized = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0, 0]
    return resized.numpy().astype(np.float16)


def _json_values(metrics: dict[str, float]) -> dict[str, float | None]:
    return {key: None if np.isnan(value) else value for key, value in metrics.items()}


def markdown_table(report: dict) -> str:
    """Per-category and mean metrics in percent with one decimal."""
    header = "| Category | " + " | ".join(metric_name(key, short=True) for key in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    rows = [_row(name, metrics) for name, metrics in report["categories"].items()]
    return "\n".join([f"## {report['dataset']} ({report.get('model', '')})", "", header, rule, *rows,
                      _row("**mean**", report["mean"]), ""])


def _row(name: str, metrics: dict) -> str:
    cells = ["—" if metrics.get(key) is None else f"{100 * metrics[key]:.1f}" for key in METRICS]
    return f"| {name} | " + " | ".join(cells) + " |"


def write_outputs(report: dict, records: list[Record], out_dir) -> dict[str, Path]:
    """Write evaluation.json, evaluation.md and evaluation.png (image and pixel curves, examples) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / name for kind, name in OUTPUT_NAMES.items()}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(report))
    evaluation_figure(example_rows(records), figure_curves(records), paths["figure"])
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


def add_arguments(parser) -> None:
    """The evaluation options, shared by ``zsad evaluate`` and ``train/evaluate.py``."""
    parser.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained) or a checkpoint folder / Hub id")
    parser.add_argument("--dataset", required=True, help="mvtec, visa, mpdd, btad, sdd, dagm, dtd, meta (meta.json) or folder")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument("--out", "--output-dir", dest="out", required=True,
                        help="folder for evaluation.json, evaluation.md and evaluation.png")
    parser.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    parser.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    parser.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="vision backbone precision (bfloat16: ~3x faster on CPUs with AMX, maps within Pearson 0.999; "
                        "auto: bfloat16 where the device runs it natively, float16 on GPUs without it, else float32)")
    parser.add_argument("--tiles", action="store_true",
                        help="score each image at full resolution in overlapping windows of the input size (small defects)")


def run(args) -> dict[str, Path] | None:
    """Evaluate from parsed ``add_arguments`` options; the main process writes and returns the output paths."""
    with process_group_closed_at_end(Accelerator()) as accelerator:
        report, records = evaluate(args.model, args.dataset, args.root, categories=args.categories, clip=args.clip,
                                   image_size=args.image_size, batch_size=args.batch_size,
                                   num_workers=args.num_workers, accelerator=accelerator, precision=args.precision,
                                   tiles=args.tiles)
    if not accelerator.is_main_process:
        return None
    paths = write_outputs(report, records, args.out)
    print(markdown_table(report))
    print("Wrote " + ", ".join(str(path) for path in paths.values()))
    return paths
