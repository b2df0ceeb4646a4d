"""Few-shot evaluation: the zero-shot protocol of ``zsad.evaluation.protocol`` plus, for each seed, K reference images drawn
per category from its train/good split and fused with the model's map on the common scale (docs/METHODS.md,
"Reference images"); ``zsad evaluate --shots K --seeds S``."""

import warnings

import numpy as np
import torch
from accelerate import Accelerator

from ..data import Sample, load_dataset
from ..data.model_input import ImageSet
from ..detection.references import FusionScale, ReferenceMemory, default_weight, leave_one_out_sources
from ..metrics import METRICS
from ..modeling.exceptions import ZSADError
from ..modeling.prompting import clean_class_name
from ..runtime.engine import model_features
from ..runtime.provenance import model_record
from .protocol import (
    Record,
    by_category_samples,
    category_report,
    evaluate,
    evaluation_detector,
    evaluation_model,
    evaluation_runtime,
    json_values,
    score_samples,
)


def evaluate_few_shot(model, dataset: str, root, shots: int, seeds: int = 3, categories=None, clip: str | None = None,
                      image_size: int | None = None, batch_size: int = 8, num_workers: int = 0,
                      accelerator: Accelerator | None = None, precision: str = "auto", device: str | None = None,
                      engine: str | None = None) -> tuple[dict, list[Record]]:
    """The zero-shot report of ``evaluate`` plus ``"few_shot"``: for each seed, ``shots`` reference images drawn per
    category from its train/good split fuse their reference map with the model's (docs/METHODS.md, "Reference
    images"); the metrics' mean and standard deviation over seeds, and each seed's report. Records are zero-shot."""
    if shots < 1 or seeds < 1:
        raise ZSADError(f"--shots and --seeds must be at least 1, got {shots} and {seeds}.")
    pools = reference_pools(dataset, root, categories, shots)
    accelerator = accelerator or Accelerator()
    name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
    runtime = evaluation_runtime(accelerator, device, precision)
    model = evaluation_model(model, clip, image_size, runtime).to(runtime.device)
    report, records = evaluate(model, dataset, root, categories=categories, batch_size=batch_size, num_workers=num_workers,
                               accelerator=accelerator, engine=engine)
    detector = evaluation_detector(model, engine)
    per_seed = []
    for seed in range(seeds):
        seed_records = []
        for category, samples in by_category_samples(load_dataset(dataset, root, categories=categories)).items():
            pool = pools[category]
            drawn = [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), shots, replace=False))]
            memory, scale = reference_memory(detector, drawn, category)
            seed_records += score_samples(detector, samples, batch_size, num_workers, accelerator, memory=memory, scale=scale,
                                   label=f"evaluating {category}, {shots}-shot, seed {seed}")
        if accelerator.is_main_process:
            per_seed.append({"seed": seed, **category_report(seed_records)})
    if not accelerator.is_main_process:
        return {}, []
    report["model"] = name
    report["evaluated_model"] = model_record(model, name)
    report["few_shot"] = {"shots": shots, "seeds": list(range(seeds)), **seed_statistics(per_seed), "per_seed": per_seed}
    return report, records


def reference_pools(dataset: str, root, categories, shots: int) -> dict[str, list[Sample]]:
    """Each category's good training images, at least ``shots`` of them, or a ZSADError saying what is missing."""
    try:
        train = [sample for sample in load_dataset(dataset, root, categories=categories, split="train") if not sample.label]
    except ZSADError as error:
        raise ZSADError(f"Few-shot evaluation draws reference images from each category's train/good split, which this "
                        f"'{dataset}' dataset does not have ({error}). Evaluate without --shots.") from error
    pools = by_category_samples(train)
    for category in by_category_samples(load_dataset(dataset, root, categories=categories)):
        if len(pools.get(category, [])) < shots:
            raise ZSADError(f"Category {category} has {len(pools.get(category, []))} good training images; --shots {shots} "
                            "needs at least that many in its train/good split.")
    return pools


def reference_memory(detector, samples: list[Sample], category: str) -> tuple[ReferenceMemory, FusionScale]:
    """The patch-feature memory of reference images, encoded in one batch on the detector's engine, and the fusion
    scale of their leave-one-out maps with the model's default weight (as a profile built from them without defective
    images)."""
    model = detector.model("model")
    dataset = ImageSet(samples, model.image_processor)
    pixel_values = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    with torch.inference_mode():
        features = model_features(detector.engine, model, pixel_values.to(detector.backbone.device))
    memory, scale = ReferenceMemory.from_features(features), FusionScale(default_weight(model.config.is_trained))
    if memory.num_images < 2:
        return memory, scale
    good = leave_one_out_sources(model, memory, [features], clean_class_name(category))
    return memory, FusionScale.from_good(good, scale.weight)


def seed_statistics(per_seed: list[dict]) -> dict:
    """Mean and (population) standard deviation over seeds of the mean metrics and of each category's metrics."""
    def stats(rows: list[dict]) -> tuple[dict, dict]:
        values = {key: np.array([np.nan if row[key] is None else row[key] for row in rows], dtype=np.float64) for key in METRICS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return ({key: float(np.nanmean(v)) for key, v in values.items()}, {key: float(np.nanstd(v)) for key, v in values.items()})

    mean, std = stats([report["mean"] for report in per_seed])
    categories = {name: stats([report["categories"][name] for report in per_seed]) for name in per_seed[0]["categories"]}
    return {"mean": json_values(mean), "std": json_values(std),
            "categories": {name: {"mean": json_values(m), "std": json_values(s)} for name, (m, s) in categories.items()}}
