"""Batch prediction over image files and folders: overlays, masks and ``scores.json`` in an output folder.

```python
>>> from zsad.inference import AnomalyDetector
>>> from zsad.predict import predict_files
>>> summary = predict_files(AnomalyDetector.for_model("stackclip"), ["parts/"], "metal nut", "results/")
```
"""

import json
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .errors import ZSADError
from .images import IMAGE_SUFFIXES, image_files, load_image
from .inference import AnomalyDetector, Detection, check_optional_threshold, thresholds
from .modeling.prompting import clean_class_name
from .profile import ProductProfile


def predict_files(
    detector: AnomalyDetector,
    images: Sequence[str | Path],
    class_name: str,
    out_dir: str | Path,
    threshold: float | None = None,
    batch_size: int = 8,
    profile: ProductProfile | None = None,
) -> dict:
    """Overlays and masks as PNGs plus ``scores.json`` in ``out_dir``, in batches with a progress bar.

    ``profile`` adds reference images and calibrated thresholds (a given ``threshold`` overrides those; without
    either it is 0.5). Unreadable images are recorded with their error and skipped; the returned dict is what
    ``scores.json`` holds.
    """
    if batch_size < 1:
        raise ZSADError(f"The batch size must be at least 1, got {batch_size}.")
    check_optional_threshold(threshold)
    class_name = clean_class_name(class_name)
    paths = image_files(images)
    if not paths:
        raise ZSADError("No image files were given (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ").")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _output_names(paths)
    records = []
    with tqdm(total=len(paths), unit="image", desc="zsad predict") as progress:
        for start in range(0, len(paths), batch_size):
            chunk = list(zip(paths[start : start + batch_size], names[start : start + batch_size]))
            records.extend(_predict_chunk(detector, chunk, class_name, out_dir, threshold, profile))
            progress.update(len(chunk))
    method = detector.method_names[0]
    image_threshold, pixel_threshold, calibration = thresholds(threshold, profile)
    summary = {"method": method, "status": detector.status(method), "class_name": class_name, "threshold": image_threshold,
               "pixel_threshold": pixel_threshold, "calibration": calibration, "references": profile.num_references if profile else 0,
               "images": records}
    (out_dir / "scores.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _output_names(paths: list[Path]) -> list[str]:
    """File stems, made unique with a counter where two inputs share one (``a/x.png``, ``b/x.png``)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return names


def _predict_chunk(detector: AnomalyDetector, chunk, class_name: str, out_dir: Path, threshold: float | None,
                   profile: ProductProfile | None) -> list[dict]:
    """One batch; records in input order, unreadable images recorded with their error."""
    pictures, errors = {}, {}
    for index, (path, _) in enumerate(chunk):
        try:
            pictures[index] = load_image(path)
        except ZSADError as error:
            errors[index] = str(error)
    detections = detector.detect_batch(list(pictures.values()), class_name, threshold=threshold, profile=profile) if pictures else []
    results = dict(zip(pictures, detections))
    records = []
    for index, (path, name) in enumerate(chunk):
        if index in errors:
            records.append({"image": str(path), "error": errors[index]})
            continue
        results[index].overlay.save(out_dir / f"{name}_overlay.png")
        results[index].mask_image().save(out_dir / f"{name}_mask.png")
        records.append({"image": str(path), "overlay": f"{name}_overlay.png", "mask": f"{name}_mask.png", **_image_summary(results[index])})
    return records


def _image_summary(result: Detection) -> dict:
    summary = result.summary()
    return {key: summary[key] for key in ("score", "verdict", "anomalous_pixel_fraction", "note", "details", "seconds")}
