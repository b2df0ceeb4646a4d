"""The Space's requests: one image (``make_handler``) and a batch (``make_batch_handler``), each returning a typed
result that ``as_gradio()`` turns into the outputs' tuple. Every error a user can cause comes back as ``gr.Error``
with zsad's message; the app keeps serving."""

import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

import zsad.runtime.images
from zsad.cli.summaries import mutual_lines
from zsad.detection.conformal import good_images_needed
from zsad.detection.detector import AnomalyDetector
from zsad.detection.mutual import detect_mutual_groups
from zsad.detection.profile import ProductProfile
from zsad.detection.results import UNSCALED_STATUSES, Detection
from zsad.modeling.class_names import product_name
from zsad.modeling.exceptions import ZSADError
from zsad.modeling.image_processing_zsad import check_threshold
from zsad.modeling.lru_cache import LRUCache
from zsad.modeling.prompting import clean_class_name

from .config import COMPARE, DISPLAY_SIDE, PROFILE_CACHE_SIZE, BatchCaps, ReferenceCaps
from .files import FullResolution, OutputFolders, png_bytes, thumbnail, write_batch_csv
from .render import anomalous_percent, batch_summary, gallery, report, scored_caption, table_row
from .scheduling import BATCH_CHUNK, ComputeTurns
from .uploads import BatchImage, Upload, batch_images, content_hash, mask_names, read_upload, received_file, received_files, upload_size

CALIBRATED = "calibrated"  # the calibrated thresholds when the references give them, else the slider's
SLIDER = "slider"  # the slider's threshold, references or not
# The reference box's false-alarm rates (the API's values): "lowest" is the good-quantile default, whose bound is
# 1 in (n + 1) for n distinct references; the others are the conformal rule, each reachable within MAX_REFERENCES.
LOWEST_RATE = "lowest"
FALSE_ALARM_RATES = {LOWEST_RATE: None, "1 in 20": 0.05, "1 in 10": 0.1, "1 in 5": 0.2}
THRESHOLD_MODES = (CALIBRATED, SLIDER)


def rate_choice_info() -> str:
    """What the reference box's rate choice says: each rate with the distinct good images it needs."""
    needs = ", ".join(f"{choice} (needs {good_images_needed(rate)} references)"
                      for choice, rate in FALSE_ALARM_RATES.items() if rate is not None)
    return f"the most good parts the calibrated thresholds may flag: {LOWEST_RATE} (1 in references + 1), {needs}"


@dataclass
class ReferenceSet:
    """The profiles built from a request's reference images ({} without references) and the names of the references
    left out as duplicates (the same content as an earlier one)."""

    profiles: dict[str, ProductProfile] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)

    def calibrated(self, method: str) -> bool:
        profile = self.profiles.get(method)
        return profile is not None and profile.calibration is not None


def decided_threshold(threshold_mode: str, slider: float, status: str, calibrated: bool = False, mutual: bool = False) -> float | None:
    """The threshold a method's detection is given: the slider's in "slider" mode; in "calibrated" mode None (the
    calibrated thresholds) where references calibrated it, else the slider's, except for an untrained or training-free
    text method, whose unscaled scores the slider's default means nothing for: None then gives score, map and rank but
    no verdict (``zsad.detection.results.gives_verdict``, as the CLI without --threshold). Choosing "slider" is
    setting the threshold by hand."""
    if threshold_mode == SLIDER:
        return slider
    if calibrated:
        return None
    return slider if mutual or status not in UNSCALED_STATUSES else None


class ReferenceProfiles:
    """Product profiles built from uploaded reference images, once per set of distinct references: keyed on the
    files' contents, the method (or compare) and the class name, the last ``PROFILE_CACHE_SIZE`` kept. Each
    reference is decoded on its own at ``ReferenceCaps.max_side`` (the model sees 518 px), within ``ReferenceCaps``."""

    def __init__(self, detector: AnomalyDetector, size: int = PROFILE_CACHE_SIZE, caps: ReferenceCaps = ReferenceCaps()):
        self.detector = detector
        self.caps = caps
        self._cache = LRUCache(size)
        self.builds = 0

    def get(self, payloads, class_name: str, method: str, false_alarm_rate: str = LOWEST_RATE) -> ReferenceSet:
        if false_alarm_rate not in FALSE_ALARM_RATES:
            raise ZSADError(f"The false-alarm rate must be one of {', '.join(FALSE_ALARM_RATES)}, got {false_alarm_rate!r}.")
        uploads = received_files(payloads)
        if not uploads:
            return ReferenceSet()
        if len(uploads) > self.caps.max_images:
            raise ZSADError(f"{len(uploads)} reference images were given; at most {self.caps.max_images} are used (each adds to "
                            f"memory and time). Pick up to {self.caps.max_images} typical good parts.")
        distinct: dict[str, Upload] = {}
        duplicates = []
        for upload in uploads:
            digest = content_hash(upload)
            if digest in distinct:
                duplicates.append(upload.name)
            else:
                distinct[digest] = upload
        self._check_pixels(list(distinct.values()))
        key = (tuple(distinct), method, clean_class_name(class_name), false_alarm_rate)
        profiles = self._cache.get(key, lambda: self._build(list(distinct.values()), class_name, method,
                                                            FALSE_ALARM_RATES[false_alarm_rate]))
        return ReferenceSet(profiles, duplicates)

    def _check_pixels(self, uploads: list[Upload]) -> None:
        total = 0
        for number, upload in enumerate(uploads, start=1):
            try:
                width, height = upload_size(upload)
            except ZSADError as error:
                raise ZSADError(f"Reference image {number}: {error}") from error
            total += width * height
        if total > self.caps.max_megapixels * 1e6:
            raise ZSADError(f"The reference images hold {total / 1e6:.0f} megapixels; the Space takes at most "
                            f"{self.caps.max_megapixels:g} megapixels per set. Use fewer or smaller images, or build the profile "
                            "with `zsad calibrate` and run `zsad predict --profile DIR` (no limit).")

    def _build(self, uploads: list[Upload], class_name: str, method: str, rate: float | None) -> dict[str, ProductProfile]:
        pictures = []
        for number, upload in enumerate(uploads, start=1):
            try:
                pictures.append(read_upload(upload, max_side=self.caps.max_side).image)
            except ZSADError as error:
                raise ZSADError(f"Reference image {number}: {error}") from error
        methods = self.detector.method_names if method == COMPARE else [method]
        self.builds += 1
        return self.detector.build_profiles(methods, class_name, pictures, false_alarm_rate=rate)


@dataclass
class DetectOutput:
    """One image's answer: the (original, overlay) pair, the mask, the first method's score, the Markdown report, the
    per-method table, the compare gallery, and what the full-resolution downloads are made from."""

    pair: tuple[Image.Image, Image.Image]
    mask: Image.Image
    score: float
    report: str
    table: list[list]
    gallery: list
    full_resolution: FullResolution

    def as_gradio(self) -> tuple:
        """The outputs of /detect in order: overlay pair, mask, score, report, table, gallery, downloads (cleared: the
        last request's no longer apply), the session's full-resolution state."""
        return self.pair, self.mask, self.score, self.report, self.table, self.gallery, None, self.full_resolution


def make_handler(detector: AnomalyDetector, profiles: ReferenceProfiles | None = None, display_side: int = DISPLAY_SIDE):
    """``detect(image, class_name, method, threshold, references, tiles, threshold_mode, false_alarm_rate)`` ->
    ``DetectOutput``.

    ``threshold_mode`` says which threshold decides mask and verdict: ``"calibrated"`` (the default) uses the
    calibrated thresholds when the reference images give them (two or more distinct images) and ``threshold``
    otherwise; ``"slider"`` always uses ``threshold``. The same inputs give the same answer every time. The page shows
    images at most ``display_side`` pixels on their longest side; ``tiles`` scores the full-resolution image in
    overlapping windows of the model's input size (one method at a time, with its references when given).
    ``false_alarm_rate`` (a ``FALSE_ALARM_RATES`` key) is the most the calibrated thresholds may flag of good parts:
    "lowest" (1 in n + 1 for n references), "1 in 20", "1 in 10" or "1 in 5" (``rate_choice_info``: the references
    each needs); a rate the references cannot reach is refused with the number needed.
    """
    profiles = profiles or ReferenceProfiles(detector)

    def detect(image, class_name, method, threshold, references=None, tiles=False, threshold_mode=CALIBRATED,
               false_alarm_rate=LOWEST_RATE, progress=gr.Progress()):
        try:
            check_threshold_mode(threshold_mode)
            check_flag("tiles", tiles)
            check_method(method)
            upload = received_file(image)
            if upload is None:
                raise ZSADError("No image was given; upload or pass an image.")
            check_threshold(threshold)
            class_name = detector.product_name(class_name, None if method == COMPARE else method)
            reference_set = profiles.get(references, class_name, method, false_alarm_rate)
            chosen = {name: decided_threshold(threshold_mode, threshold, detector.status(name), reference_set.calibrated(name))
                      for name in (detector.method_names if method == COMPARE else [method])}
            results, picture = run_detection(upload, class_name, method, chosen, reference_set.profiles, tiles, progress)
        except ZSADError as error:
            raise gr.Error(str(error), print_exception=False) from error
        first = results[0]
        return DetectOutput(
            (picture, zsad.runtime.images.bounded(first.overlay, display_side)),
            zsad.runtime.images.bounded(first.mask_image(), display_side),
            round(first.score, 4),
            report(results, reference_set.profiles, reference_set.duplicates, made_by(detector, results, class_name)),
            [table_row(result) for result in results],
            gallery(results) if method == COMPARE else [],
            FullResolution.of(first, Path(upload.name).stem),
        )

    def run_detection(upload: Upload, class_name, method, chosen, by_method, tiles, progress) -> tuple[list[Detection], Image.Image]:
        """The detections (``chosen``: each method's threshold, ``by_method``: its profile) and the picture shown."""
        if method == COMPARE and tiles:
            raise ZSADError("Tiles run one method at a time: pick a method instead of 'compare all'.")
        if method == COMPARE:
            loaded = read_upload(upload, max_side=display_side)
            results = detector.compare(loaded, class_name, threshold=chosen, profiles=by_method, display_side=display_side)
            return list(results.values()), loaded.image
        threshold = chosen[method]
        if not tiles:
            loaded = read_upload(upload, max_side=display_side)
            result = detector.detect(loaded, class_name, method=method, threshold=threshold, profile=by_method.get(method),
                                     display_side=display_side)
            return [result], loaded.image
        loaded = read_upload(upload)
        result = detector.detect_tiled(loaded, class_name, method=method, threshold=threshold, profile=by_method.get(method),
                                       progress=lambda done, total: progress(done / total, desc=f"{done} of {total} tiles"))
        return [result], zsad.runtime.images.bounded(loaded.image, display_side)

    return detect


@dataclass
class BatchOutput:
    """A batch's answer: table rows ([file, score, verdict, anomalous %, mask file]), gallery, the CSV and masks zip
    paths, and the Markdown summary."""

    table: list[list]
    gallery: list
    csv_path: Path
    masks_path: Path
    summary: str

    def as_gradio(self) -> tuple:
        return self.table, self.gallery, str(self.csv_path), str(self.masks_path), self.summary


def check_flag(name: str, value) -> None:
    """The raw API sends JSON: a switch must be a JSON boolean (the string "false" would otherwise read as true)."""
    if not isinstance(value, bool):
        raise ZSADError(f"'{name}' must be true or false (a JSON boolean), got {value!r}.")


def check_threshold_mode(value) -> None:
    if value not in THRESHOLD_MODES:
        raise ZSADError(f"The threshold mode must be one of {', '.join(THRESHOLD_MODES)}, got {value!r}.")


def check_method(value) -> None:
    if not isinstance(value, str):
        raise ZSADError(f"'method' must be one method name (a string), got {value!r}.")


def made_by(detector: AnomalyDetector, results: list[Detection], class_name: str) -> dict[str, dict]:
    """Each result's provenance block: the product name as typed and as used, the thresholds the result applied."""
    return {result.method: detector.provenance(result.method, class_name, result.class_name,
                                               (result.threshold, result.mask_threshold, result.calibration)) for result in results}


def read_chunk(chunk: list[BatchImage], max_side: int | None = None) -> list:
    """Each image of the chunk decoded (its longest side at most ``max_side``), or its error: unreadable, or a row
    already refused."""
    outcomes = []
    for image in chunk:
        try:
            if image.error is not None:
                raise ZSADError(image.error)
            outcomes.append(zsad.runtime.images.read_image(image.read(), name=image.name, max_side=max_side))
        except ZSADError as error:
            outcomes.append(error)
    return outcomes


def scored_outcomes(outcomes: list, detections: list[Detection]) -> list[Detection | ZSADError]:
    """``outcomes`` with each decoded image replaced by its detection (in order), the errors kept."""
    remaining = iter(detections)
    return [outcome if isinstance(outcome, ZSADError) else next(remaining) for outcome in outcomes]


def detect_chunk(detector: AnomalyDetector, chunk: list[BatchImage], class_name: str, method: str,
                 threshold: float | None) -> list[Detection | ZSADError]:
    """One forward pass over the chunk's readable images; an unreadable one (or a row already refused) gets its error."""
    outcomes = read_chunk(chunk)
    pictures = [outcome for outcome in outcomes if not isinstance(outcome, ZSADError)]
    return scored_outcomes(outcomes, detector.detect_batch(pictures, class_name, method=method, threshold=threshold) if pictures else [])


def detect_mutually(detector: AnomalyDetector, images: list[BatchImage], class_name: str, method: str, threshold: float,
                    turns: ComputeTurns) -> Iterator[tuple[int, Detection | ZSADError]]:
    """The batch's readable images scored against each other (``zsad.detection.mutual.detect_mutual_groups``), decoded at the
    page's ``DISPLAY_SIDE`` (the batch caps bound them), as (position, outcome): the errors first, then each group's
    detections as soon as it is scored; each encoding chunk and each group's scoring in its own compute turn."""
    outcomes = read_chunk(images, max_side=DISPLAY_SIDE)
    readable = [i for i, outcome in enumerate(outcomes) if not isinstance(outcome, ZSADError)]
    if len(readable) < 2:
        raise ZSADError(f"Scoring the images against each other needs at least two readable images of the product; "
                        f"{len(readable)} of {len(images)} could be read.")
    groups = detect_mutual_groups(detector, [outcomes[i] for i in readable], class_name, method=method, threshold=threshold,
                                  batch_size=BATCH_CHUNK, turn=turns.batch_chunk)

    def scored() -> Iterator[tuple[int, Detection | ZSADError]]:
        yield from ((i, outcome) for i, outcome in enumerate(outcomes) if isinstance(outcome, ZSADError))
        for group in groups:
            yield from ((readable[i], outcome) for i, outcome in zip(group.indices, group.outcomes))

    return scored()


def batch_class_name(detector: AnomalyDetector, class_name, method: str, mutual: bool) -> str:
    """The product's name; it may be left empty for a method whose prompts name no product, or when the images are
    scored against each other by a method whose text map mutual scoring leaves out (not trained), and is then recorded
    as the generic ``UNNAMED_PRODUCT``."""
    if mutual and detector.status(method) != "trained":
        return product_name(class_name, required=False)
    return detector.product_name(class_name, method)


def batch_row(image: BatchImage, outcome: Detection | ZSADError, mask_name: str) -> list:
    """[file, score, verdict, anomalous pixel %, mask file, error] (score, % and mask empty for a row not scored)."""
    if isinstance(outcome, ZSADError):
        return [image.name, None, "skipped" if image.skipped else "unreadable", None, "", str(outcome)]
    return [image.name, outcome.score, outcome.verdict, anomalous_percent(outcome), mask_name, ""]


def make_batch_handler(detector: AnomalyDetector, folders: OutputFolders, caps: BatchCaps = BatchCaps(), turns: ComputeTurns | None = None):
    """``detect_batch(files, class_name, method, threshold, mutual, threshold_mode)`` -> ``BatchOutput``. ``files`` are
    uploaded image files and zips of images; errors that concern the whole batch (caps, class name, method, threshold,
    fewer than two readable images when ``mutual``) come back as ``gr.Error``, a file or zip member that cannot be scored
    as its row's error. ``mutual`` scores the images against each other (no text, no references needed) instead of one
    by one. ``threshold_mode`` as for /detect (a batch has no references): "calibrated" gives an untrained or
    training-free method scored one by one no verdict, "slider" decides at ``threshold``."""
    turns = turns or ComputeTurns()

    def detect_batch(uploads, class_name, method, threshold, mutual=False, threshold_mode=CALIBRATED, progress=gr.Progress()):
        started = time.perf_counter()
        try:
            check_flag("mutual", mutual)
            check_threshold_mode(threshold_mode)
            check_method(method)
            images = batch_images(list(uploads or []), caps)
            status = detector.status(method)
            class_name = batch_class_name(detector, class_name, method, mutual)
            check_threshold(threshold)
            threshold = decided_threshold(threshold_mode, threshold, status, mutual=mutual)
        except ZSADError as error:
            raise gr.Error(str(error), print_exception=False) from error
        folder = folders.new_folder()
        try:
            rows, views, notes = run_batch(images, class_name, method, threshold, mutual, folder, progress)
            table_path = write_batch_csv(rows, folder / "scores.csv")
        except ZSADError as error:
            raise gr.Error(str(error), print_exception=False) from error
        finally:
            folders.done(folder)
        summary = batch_summary(rows, method, status, threshold, time.perf_counter() - started, notes)
        table = [[name, None if score is None else round(score, 4), verdict, percent, mask] for name, score, verdict, percent, mask, _ in rows]
        return BatchOutput(table, views, table_path, folder / "masks.zip", summary)

    def run_batch(images: list[BatchImage], class_name: str, method: str, threshold: float | None, mutual: bool, folder: Path, progress):
        """Rows, gallery views and the summary's lines on mutual scoring; the masks written to the folder's masks.zip."""
        notes: list[str] = []
        names = mask_names([image.name for image in images])
        with zipfile.ZipFile(folder / "masks.zip", "w", compression=zipfile.ZIP_STORED) as masks:

            def written(position: int, outcome: Detection | ZSADError) -> tuple[list, tuple | None]:
                """The image's row and gallery view, its mask added to masks.zip."""
                image = images[position]
                if not isinstance(outcome, Detection):
                    return batch_row(image, outcome, names[position]), None
                masks.writestr(names[position], png_bytes(outcome.mask_image()))
                return batch_row(image, outcome, names[position]), (thumbnail(outcome.overlay, folder / f"{position + 1}.webp"),
                                                                     f"{image.name}: {scored_caption(outcome)}")

            if mutual:
                progress((0, len(images)), desc=f"scoring {len(images)} images against each other", unit="images")
                done, compared, image_notes = {}, [], []
                for position, outcome in detect_mutually(detector, images, class_name, method, threshold, turns):
                    done[position] = written(position, outcome)  # the detection itself is freed with its group
                    if isinstance(outcome, Detection):
                        compared.append(outcome.details.compared_with)
                        image_notes.append(outcome.note)
                notes = mutual_lines(compared, image_notes)
                finished = [done[position] for position in range(len(images))]
            else:
                finished = []
                for start in range(0, len(images), BATCH_CHUNK):
                    progress((start, len(images)), desc=f"{start} of {len(images)} images done", unit="images")
                    with turns.batch_chunk():
                        outcomes = detect_chunk(detector, images[start:start + BATCH_CHUNK], class_name, method, threshold)
                    finished += [written(start + offset, outcome) for offset, outcome in enumerate(outcomes)]
        rows = [row for row, _ in finished]
        views = [view for _, view in finished if view is not None]
        return rows, views, notes

    return detect_batch


__all__ = ["CALIBRATED", "FALSE_ALARM_RATES", "LOWEST_RATE", "SLIDER", "BatchOutput", "DetectOutput", "ReferenceProfiles",
           "make_batch_handler", "make_handler", "rate_choice_info"]
