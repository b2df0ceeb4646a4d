"""Batch prediction over image files and folders: overlays, masks and ``scores.json`` in an output folder.

```python
>>> from zsad.inference import AnomalyDetector
>>> from zsad.predict import predict_files
>>> summary = predict_files(AnomalyDetector.for_model("stackclip"), ["parts/"], "metal nut", "results/")
```
"""

import contextlib
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .detection import MUTUAL_CALIBRATION, Detection, check_optional_threshold
from .errors import ZSADError
from .images import IMAGE_SUFFIXES, bounded, image_files, read_image
from .modeling.class_names import clean_class_name
from .modeling.image_processing_zsad import is_finite_score, non_finite_message
from .runs import claim_folder, folder_lock, run_record

if TYPE_CHECKING:  # torch: an exported graph (zsad.deploy) is run through here without it
    from accelerate import PartialState

    from .inference import AnomalyDetector
    from .profile import ProductProfile

RECORDS_GLOB = "records-*.jsonl"
SCORES_JSON = "scores.json"
# What a scored image's record holds (an unreadable image's record holds "image" and "error").
RECORD_KEYS = ("image", "overlay", "mask", "score", "verdict")


def predict_files(
    detector: "AnomalyDetector",
    images: Sequence[str | Path],
    class_name: str,
    out_dir: str | Path,
    threshold: float | None = None,
    batch_size: int = 8,
    profile: "ProductProfile | None" = None,
    display_side: int | None = None,
    tiles: bool = False,
    resume: bool = False,
    state: "PartialState | None" = None,
    mutual: bool = False,
) -> dict:
    """Overlays and masks as PNGs plus ``scores.json`` in ``out_dir``, in batches with a progress bar.

    ``profile`` adds reference images and calibrated thresholds (a given ``threshold`` overrides those; without
    either it is 0.5). Each image's record is appended to ``records-<process>.jsonl`` as soon as its files are
    written, so an interrupted run keeps what it finished; ``resume`` skips the images recorded there (unreadable
    images are tried again) and the rest starts afresh. Under ``accelerate launch`` the images are shared between the
    processes (``state``: the Accelerate state; default one process) and the main process merges every record, in
    input order, into ``scores.json``. Overlays and masks are at each image's full size unless ``display_side`` bounds
    the longest side; ``tiles`` scores each image at full resolution in model-size windows
    (``AnomalyDetector.detect_tiled``). ``mutual`` scores the images against each other
    (``AnomalyDetector.detect_mutual``): every image to do, or each process's share of them, is one batch. Unreadable
    images are recorded with their error and skipped; the returned dict is what ``scores.json`` holds (an empty dict
    on the other processes).
    """
    if batch_size < 1:
        raise ZSADError(f"The batch size must be at least 1, got {batch_size}.")
    if mutual and tiles:
        raise ZSADError("--mutual and --tiles cannot be combined; mutual scoring compares whole images.")
    if mutual and resume:
        raise ZSADError("--mutual scores are relative to the whole batch, so a run cannot be resumed; run it again without --resume.")
    check_optional_threshold(threshold)
    class_name = clean_class_name(class_name)
    paths = image_files(images)
    if not paths:
        raise ZSADError("No image files were given (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ").")
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ZSADError(f"The output folder '{out_dir}' is a file; give --out a folder (it is made if it does not exist).")
    out_dir.mkdir(parents=True, exist_ok=True)
    method = detector.method_names[0]
    # Mutual verdicts are on the batch's own scale: a profile adds its reference map, not its thresholds.
    image_threshold, pixel_threshold, calibration = detector.verdict_thresholds(class_name, threshold, None if mutual else profile)
    summary = {"method": method, "status": detector.status(method), "class_name": class_name, "threshold": image_threshold,
               "pixel_threshold": pixel_threshold, "calibration": f"{MUTUAL_CALIBRATION}{calibration}" if mutual else calibration,
               "references": profile.num_references if profile else 0, **({"mutual": True} if mutual else {})}
    settings = {**summary, "profile": _profile_identity(profile), "tiles": tiles, "display_side": display_side}
    record = run_record(detector, method, settings)
    with folder_lock(out_dir) if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            claim_folder(out_dir, record, resume, clear=[RECORDS_GLOB, SCORES_JSON])
        state.wait_for_everyone()
        jobs = list(zip(paths, _output_names(paths)))
        finished = {record["image"] for record in read_records(out_dir) if "score" in record} if resume else set()
        todo = [job for job in jobs if str(job[0]) not in finished]
        if mutual and len(todo) < 2 * state.num_processes:
            raise ZSADError(f"Mutual scoring compares images with each other: give at least two images per process, got {len(todo)} "
                            f"for {state.num_processes}.")
        detect = partial(_detect, detector, class_name=class_name, threshold=threshold, profile=profile, display_side=display_side,
                         tiles=tiles, mutual=mutual, batch_size=batch_size, progress=state.is_local_main_process)
        _score_shard(detect, state, todo, out_dir, batch_size, display_side, tiles, mutual)
        state.wait_for_everyone()
        if not state.is_main_process:
            return {}
        by_image = {record["image"]: record for record in read_records(out_dir)}
        summary["images"] = [by_image[str(path)] for path, _ in jobs]
        reused = len(jobs) - len(todo)
        if reused:
            summary["reused"] = reused
        write_text_atomic(out_dir / SCORES_JSON, json.dumps(summary, indent=1) + "\n")
    return summary


def _score_shard(detect, state: "PartialState", todo: list, out_dir: Path, batch_size: int, display_side: int | None, tiles: bool,
                 mutual: bool) -> None:
    """This process's share of ``todo``, each chunk's records appended to its own records file as soon as they are made."""
    with state.split_between_processes(todo) as shard, _record_stream(out_dir / f"records-{state.process_index}.jsonl") as stream:
        with tqdm(total=len(shard), unit="image", desc="zsad predict", disable=not state.is_local_main_process) as progress:
            step = len(shard) if mutual else 1 if tiles else batch_size
            for start in range(0, len(shard), step):
                chunk = shard[start : start + step]
                for record in _predict_chunk(detect, chunk, out_dir, display_side, tiles):
                    stream.write(json.dumps(record) + "\n")
                stream.flush()
                progress.update(len(chunk))


def _profile_identity(profile: "ProductProfile | None") -> dict | None:
    """What tells one profile from another in a run record: its product, method, references and calibration (not the time
    it was made: ``--reference DIR`` builds the same profile afresh on every run)."""
    if profile is None:
        return None
    calibration = profile.calibration
    return {"class_name": profile.class_name, "method": profile.method, "references": profile.num_references,
            "fusion_weight": profile.fusion.weight,
            "thresholds": [calibration.image_threshold, calibration.pixel_threshold] if calibration else None}


def _record_stream(path: Path):
    """``path`` opened for appending, on a line of its own (an interrupted run may have left half a line)."""
    cut_short = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    stream = open(path, "a")
    if cut_short:
        stream.write("\n")
    return stream


def read_records(out_dir: Path) -> list[dict]:
    """Every valid record streamed to ``out_dir``'s ``records-*.jsonl`` files, later ones last. A line that is not a
    valid record (cut short by an interruption, not UTF-8, not a JSON object, keys or a numeric score missing) is
    ignored with a warning naming it: its image is done again."""
    records = []
    for path in sorted(out_dir.glob(RECORDS_GLOB)):
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            record, problem = _parsed_record(line)
            if problem:
                warnings.warn(f"{path.name} line {number} ignored ({problem}); its image is done again.", stacklevel=2)
            else:
                records.append(record)
    return records


def _parsed_record(line: bytes) -> tuple[dict | None, str | None]:
    """(record, None) for a valid record, else (None, what is wrong with it)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError:
        return None, "not JSON; cut short?"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not isinstance(record.get("image"), str):
        return None, "no image path"
    if "error" in record:
        return (record, None) if isinstance(record["error"], str) else (None, "an error that is not text")
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        return None, f"no {', '.join(missing)}"
    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None, "no numeric score"
    return record, None


def _output_names(paths: list[Path]) -> list[str]:
    """One name per input for its overlay and mask, unique case-insensitively (as the Space's ``masks.zip``): the file's
    stem where no other input shares it, else its full name (``x.jpg``, ``x.png``), numbered where even that repeats
    (``a/x.png``, ``b/x.png``: ``x.png``, ``x.png (2)``)."""
    stems = Counter(path.stem.casefold() for path in paths)
    taken: set[str] = set()
    names = []
    for path in paths:
        base = path.stem if stems[path.stem.casefold()] == 1 else path.name
        candidate, number = base, 1
        while candidate.casefold() in taken:
            number += 1
            candidate = f"{base} ({number})"
        taken.add(candidate.casefold())
        names.append(candidate)
    return names


def _predict_chunk(detect: Callable[[list], list[Detection]], chunk, out_dir: Path, display_side: int | None, tiles: bool) -> list[dict]:
    """One batch (one image when tiled, every image when mutual); records in input order, unreadable images recorded
    with their error."""
    pictures, errors = {}, {}
    for index, (path, _) in enumerate(chunk):
        try:
            pictures[index] = read_image(path, max_side=None if tiles else display_side)
        except ZSADError as error:
            errors[index] = str(error)
    detections = detect(list(pictures.values())) if pictures else []
    results = dict(zip(pictures, detections))
    records = []
    for index, (path, name) in enumerate(chunk):
        if index in errors:
            records.append({"image": str(path), "error": errors[index]})
            continue
        result = results[index]
        if not is_finite_score(result.score):
            records.append({"image": str(path), "error": non_finite_message(result.score)})
            continue
        overlay, mask = result.overlay, result.mask_image()
        if tiles and display_side:
            overlay, mask = bounded(overlay, display_side), bounded(mask, display_side)
        overlay.save(out_dir / f"{name}_overlay.png")
        mask.save(out_dir / f"{name}_mask.png")
        records.append({"image": str(path), "overlay": f"{name}_overlay.png", "mask": f"{name}_mask.png", **_image_summary(result)})
    return records


def _detect(detector: "AnomalyDetector", pictures: list, *, class_name: str, threshold: float | None, profile: "ProductProfile | None",
            display_side: int | None, tiles: bool, mutual: bool, batch_size: int, progress: bool) -> list[Detection]:
    if mutual:
        return detector.detect_mutual(pictures, class_name, method=detector.method_names[0], threshold=threshold, profile=profile,
                                      batch_size=batch_size, display_side=display_side, progress=progress)
    if tiles:
        return [detector.detect_tiled(picture, class_name, threshold=threshold, profile=profile) for picture in pictures]
    return detector.detect_batch(pictures, class_name, threshold=threshold, profile=profile, display_side=display_side)


def _image_summary(result: Detection) -> dict:
    summary = result.summary()
    return {key: summary[key] for key in ("score", "verdict", "anomalous_pixel_fraction", "note", "details", "seconds", "tiles")}
