"""Batch prediction over image files and folders: overlays, masks and ``scores.json`` in an output folder.

```python
>>> from zsad.detection.detector import AnomalyDetector
>>> from zsad.cli.predict import predict_files
>>> summary = predict_files(AnomalyDetector.for_model("stackclip"), ["parts/"], "metal nut", "results/")
```
"""

import contextlib
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..detection.results import MUTUAL_CALIBRATION, NO_VERDICT_LINE, Detection, check_optional_threshold, gives_verdict
from ..modeling.class_names import clean_class_name
from ..modeling.exceptions import ZSADError
from ..modeling.image_processing_zsad import is_finite_score, non_finite_message
from ..runtime.atomic import write_text_atomic
from ..runtime.images import IMAGE_SUFFIXES, bounded, image_files, read_image
from ..runtime.noise import bar_disable
from .runs import claim_folder, folder_lock, run_record

if TYPE_CHECKING:  # torch: an exported graph (zsad.deploy.runtime) is run through here without it
    from accelerate import PartialState

    from ..detection.detector import AnomalyDetector
    from ..detection.profile import ProductProfile
    from ..modeling.mutual_scoring import MutualSettings

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
    mutual_settings: "MutualSettings | None" = None,
) -> dict:
    """Overlays and masks as PNGs plus ``scores.json`` in ``out_dir``, in batches with a progress bar.

    ``profile`` adds reference images and calibrated thresholds (a given ``threshold`` overrides those; without
    either it is 0.5). Each image's record is appended to ``records-<process>.jsonl`` as soon as its files are
    written, so an interrupted run keeps what it finished; ``resume`` skips the images recorded there (unreadable
    images are tried again) and the rest starts afresh. Under ``accelerate launch`` the images are shared between the
    processes (``state``: the Accelerate state; default one process) and the main process merges every record, in
    input order, into ``scores.json``. Overlays and masks are at each image's full size unless ``display_side`` bounds
    the longest side; ``tiles`` scores each image at full resolution in model-size windows
    (``AnomalyDetector.detect_tiled``). ``mutual`` scores the images against each other in groups fixed from the
    files' bytes (``zsad.detection.mutual.detect_mutual_groups``, ``mutual_settings``): each group is decoded, scored and
    written on its own, so memory stays that of one group; processes share whole groups, and ``resume`` skips the
    groups whose every image was recorded as part of that same group. Unreadable images are recorded with their error
    and skipped; the returned dict is what ``scores.json`` holds (an empty dict on the other processes).
    """
    if batch_size < 1:
        raise ZSADError(f"The batch size must be at least 1, got {batch_size}.")
    if mutual and tiles:
        raise ZSADError("--mutual and --tiles cannot be combined; mutual scoring compares whole images.")
    check_optional_threshold(threshold)
    given_name, class_name = class_name, clean_class_name(class_name)
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
    jobs = list(zip(paths, _output_names(paths)))
    method = detector.method_names[0]
    # Mutual verdicts are on each group's own scale: a profile adds its reference map, not its thresholds.
    image_threshold, pixel_threshold, calibration = detector.verdict_thresholds(class_name, threshold, None if mutual else profile)
    calibration = f"{MUTUAL_CALIBRATION}{calibration}" if mutual else calibration
    block = detector.provenance(method, given_name, class_name, (image_threshold, pixel_threshold, calibration))
    options = dict(class_name=class_name, threshold=threshold, profile=profile, display_side=display_side, batch_size=batch_size,
                   block=block)
    settings = {"profile": _profile_identity(profile), "tiles": tiles, "display_side": display_side, "mutual": mutual,
                "mutual_settings": repr(mutual_settings) if mutual else None}
    with folder_lock(out_dir) if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            claim_folder(out_dir, run_record(block, settings), resume, clear=[RECORDS_GLOB, SCORES_JSON])
        state.wait_for_everyone()
        records = read_records(out_dir) if resume else []
        if mutual:
            plan = _MutualPlan.of(jobs, mutual_settings)
            reused = len(jobs) - sum(map(len, plan.to_do(records)))
            _predict_mutual(detector, plan, records, out_dir, state, **options)
            state.wait_for_everyone()
            if not state.is_main_process:
                return {}
            by_image = plan.current_records(read_records(out_dir))
        else:
            finished = {record["image"] for record in records if "score" in record}
            reused = sum(str(path) in finished for path, _ in jobs)
            _predict_each(detector, jobs, records, out_dir, state, tiles=tiles, **options)
            state.wait_for_everyone()
            if not state.is_main_process:
                return {}
            by_image = {record["image"]: record for record in read_records(out_dir)}
        verdicts = gives_verdict(detector.status(method), calibration)
        summary = {"method": method, "status": detector.status(method), "class_name": class_name,
                   "threshold": image_threshold if verdicts else None, "gives_verdict": verdicts,
                   "verdict_line": f"image threshold {image_threshold:.3f} ({calibration})" if verdicts else NO_VERDICT_LINE,
                   "pixel_threshold": pixel_threshold, "calibration": calibration, "provenance": block,
                   "references": profile.num_references if profile else 0,
                   "false_alarm_bound": None if mutual or threshold is not None else stated_bound(profile),
                   **({"mutual": True} if mutual else {}), **({"reused": reused} if reused else {}),
                   "images": [by_image[str(path)] for path, _ in jobs]}
        write_text_atomic(out_dir / SCORES_JSON, json.dumps(summary, indent=1) + "\n")
    return summary


def _profile_identity(profile: "ProductProfile | None") -> dict | None:
    """What tells one profile from another in a run record: its product, method, references and calibration (not the time
    it was made: ``--reference DIR`` builds the same profile afresh on every run)."""
    if profile is None:
        return None
    calibration = profile.calibration
    return {"class_name": profile.class_name, "method": profile.method, "references": profile.num_references,
            "fusion_weight": profile.fusion.weight,
            "thresholds": [calibration.image_threshold, calibration.pixel_threshold] if calibration else None}


def stated_bound(profile) -> float | None:
    """The false-alarm rate a profile's calibrated thresholds guarantee on good parts (None: no profile, uncalibrated,
    or F1-max thresholds, which guarantee none)."""
    return profile.calibration.false_alarm_bound if profile is not None and profile.calibration is not None else None


def _predict_each(detector: "AnomalyDetector", jobs: list[tuple[Path, str]], records: list[dict], out_dir: Path,
                  state: "PartialState", *, tiles: bool, batch_size: int, block: dict, **options) -> None:
    """Every image not yet scored, in batches (one image at a time when tiled), each process its share; each record
    carries the run's provenance ``block``."""
    finished = {record["image"] for record in records if "score" in record}
    todo = [job for job in jobs if str(job[0]) not in finished]
    detect = partial(_detect, detector, tiles=tiles, batch_size=batch_size, **options)
    step = 1 if tiles else batch_size
    with state.split_between_processes(todo) as shard, _record_stream(out_dir / f"records-{state.process_index}.jsonl") as stream:
        with tqdm(total=len(shard), unit="image", desc="zsad predict", disable=bar_disable(state.is_local_main_process)) as progress:
            for start in range(0, len(shard), step):
                chunk = shard[start : start + step]
                for record in _predict_chunk(detect, chunk, out_dir, options["display_side"], tiles):
                    stream.write(json.dumps({**record, "provenance": block}) + "\n")
                stream.flush()
                progress.update(len(chunk))


class _MutualPlan:
    """A lot's comparison groups, fixed from the files' bytes before anything is scored, and the group each image
    belongs to (by id)."""

    def __init__(self, jobs: list[tuple[Path, str]], keys: list[str], groups: list[list[int]], settings: "MutualSettings"):
        from ..detection.mutual import group_id

        self.jobs, self.keys, self.groups, self.settings = jobs, keys, groups, settings
        self.ids = [group_id([keys[i] for i in group]) for group in groups]
        self.group_of = {str(jobs[i][0]): gid for group, gid in zip(groups, self.ids) for i in group}

    @classmethod
    def of(cls, jobs: list[tuple[Path, str]], settings: "MutualSettings | None") -> "_MutualPlan":
        from ..detection.mutual import MutualSettings, lot_groups, lot_keys

        settings = settings or MutualSettings()
        paths = [path for path, _ in jobs]
        keys = lot_keys(paths)
        return cls(jobs, keys, lot_groups(keys, settings, [str(path) for path in paths]), settings)

    def to_do(self, records: list[dict]) -> list[list[int]]:
        """The groups not every image of which has a score recorded as part of this very group."""
        done = {record["image"] for record in records if "score" in record and record.get("group") == self.group_of.get(record["image"])}
        return [group for group in self.groups if any(str(self.jobs[i][0]) not in done for i in group)]

    def current_records(self, records: list[dict]) -> dict[str, dict]:
        """Each image's latest record of its current group, else its latest error."""
        by_image: dict[str, dict] = {}
        for record in records:
            current = record.get("group") == self.group_of.get(record["image"])
            if current or ("error" in record and "score" not in by_image.get(record["image"], {})):
                by_image[record["image"]] = record
        return by_image


def _predict_mutual(detector: "AnomalyDetector", plan: _MutualPlan, records: list[dict], out_dir: Path, state: "PartialState", *,
                    class_name: str, threshold: float | None, profile: "ProductProfile | None", display_side: int | None,
                    batch_size: int, block: dict) -> None:
    """The groups left to do, each process its share of whole groups, each group's records written (and synced) as
    soon as its files are, so that a killed run resumes at its next group."""
    from ..detection.mutual import detect_mutual_groups

    paths = [str(path) for path, _ in plan.jobs]
    with state.split_between_processes(plan.to_do(records)) as shard, _record_stream(out_dir / f"records-{state.process_index}.jsonl") as stream:
        with tqdm(total=sum(map(len, shard)), unit="image", desc="zsad predict", disable=bar_disable(state.is_local_main_process)) as progress:
            scored = detect_mutual_groups(detector, paths, class_name, method=detector.method_names[0], threshold=threshold,
                                          profile=profile, settings=plan.settings, batch_size=batch_size, display_side=display_side,
                                          keys=plan.keys, groups=shard, skip_unreadable=True)
            for group in scored:
                for index, outcome in zip(group.indices, group.outcomes):
                    path, name = plan.jobs[index]
                    record = _error_record(path, outcome) if isinstance(outcome, ZSADError) else _write_outputs(path, name, outcome, out_dir, None)
                    stream.write(json.dumps({**record, "group": group.id, "provenance": block}) + "\n")
                stream.flush()
                os.fsync(stream.fileno())
                progress.update(len(group.indices))


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
    """One batch (one image when tiled); records in input order, unreadable images recorded with their error."""
    pictures, errors = {}, {}
    for index, (path, _) in enumerate(chunk):
        try:
            pictures[index] = read_image(path, max_side=None if tiles else display_side)
        except ZSADError as error:
            errors[index] = str(error)
    detections = detect(list(pictures.values())) if pictures else []
    results = dict(zip(pictures, detections))
    return [{"image": str(path), "error": errors[index]} if index in errors
            else _write_outputs(path, name, results[index], out_dir, display_side if tiles else None)
            for index, (path, name) in enumerate(chunk)]


def _write_outputs(path: Path, name: str, result: Detection, out_dir: Path, bound: int | None) -> dict:
    """The image's overlay and mask written (their longest side at most ``bound`` when given), and its record; a
    non-finite score is an error record instead (never a verdict)."""
    if not is_finite_score(result.score):
        return _error_record(path, ZSADError(non_finite_message(result.score)))
    overlay, mask = result.overlay, result.mask_image()
    if bound:
        overlay, mask = bounded(overlay, bound), bounded(mask, bound)
    overlay.save(out_dir / f"{name}_overlay.png")
    mask.save(out_dir / f"{name}_mask.png")
    return {"image": str(path), "overlay": f"{name}_overlay.png", "mask": f"{name}_mask.png", **_image_summary(result)}


def _error_record(path: Path, error: ZSADError) -> dict:
    return {"image": str(path), "error": str(error)}


def _detect(detector: "AnomalyDetector", pictures: list, *, class_name: str, threshold: float | None, profile: "ProductProfile | None",
            display_side: int | None, tiles: bool, batch_size: int) -> list[Detection]:
    if tiles:
        return [detector.detect_tiled(picture, class_name, threshold=threshold, profile=profile) for picture in pictures]
    return detector.detect_batch(pictures, class_name, threshold=threshold, profile=profile, display_side=display_side)


def _image_summary(result: Detection) -> dict:
    summary = result.summary()
    return {key: summary[key] for key in ("score", "verdict", "anomalous_pixel_fraction", "note", "details", "seconds", "tiles")}
