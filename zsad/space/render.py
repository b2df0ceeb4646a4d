"""What the page shows, as text: the report (Markdown, the visitor's text escaped), table rows, gallery captions,
the batch summary, the banner and the runtime line."""

import html
import json
import re
from collections.abc import Sequence

import torch

from zsad.detection.detector import AnomalyDetector
from zsad.detection.profile import ProductProfile
from zsad.detection.results import NO_VERDICT_REASON, Detection
from zsad.modeling.class_name_filter import ClassNameChoice
from zsad.modeling.image_processing_zsad import DEFAULT_THRESHOLD
from zsad.modeling.modeling_genclip import GenCLIPImageDetails
from zsad.runtime.provenance import is_tiny_random, noise_warning, short_form

from .config import COMPARE, checkpoint_variable, display_name

TABLE_HEADERS = ["method", "status", "score", "verdict", "anomalous pixels (%)", "seconds", "details"]
TABLE_TYPES = ["str", "str", "number", "str", "number", "number", "str"]  # plain text: user text never renders as HTML
BATCH_TABLE_HEADERS = ["file", "score", "verdict", "anomalous pixels (%)", "mask file"]
BATCH_TABLE_TYPES = ["str", "number", "str", "number", "str"]
# Shown with every result of an untrained or training-free method (docs/METHODS.md, "Value-value attention").
UNTRAINED_MAP_NOTE = (
    "ℹ️ Not trained: on real CLIP weights the plain dense map (patch tokens against the prompts) is near chance for "
    "localisation (AnomalyCLIP, Table 1: 38.4 pixel AUROC on MVTec AD); value-value attention helps. Reference images "
    "of good parts, and scoring a batch of parts against each other (Batch tab), are the stronger training-free signals."
)
# How the page gives a verdict where the default threshold means nothing (the CLI's words are NO_VERDICT_LINE).
NO_VERDICT_ADVICE = (f"{NO_VERDICT_REASON}. For a verdict, add two or more reference images of good parts, use a trained "
                     "checkpoint (`--checkpoint METHOD=PATH`), or choose “slider” under “Threshold used” to decide at the "
                     f"slider's threshold. The mask marks the pixels at or above {DEFAULT_THRESHOLD:g}.")
BATCH_NO_VERDICT_ADVICE = (f"{NO_VERDICT_REASON}. For a verdict, score the images against each other, use a trained "
                           "checkpoint (`--checkpoint METHOD=PATH`), or choose “slider” under “Threshold used” to decide at "
                           f"the slider's threshold. Masks mark the pixels at or above {DEFAULT_THRESHOLD:g}.")


def escaped(text: str) -> str:
    """User text shown in Markdown as typed: no HTML (``<img src=x>`` stays text), no Markdown formatting."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", html.escape(text, quote=False))


def report(results: list[Detection], profiles: dict[str, ProductProfile] | None = None, duplicates: list[str] = (),
           made_by: dict[str, dict] | None = None) -> str:
    """Markdown: the verdict of each method, its status, thresholds and where they come from, details and time;
    ``made_by``: each method's provenance block (``AnomalyDetector.provenance``), shown in its short form."""
    lines = []
    for result in results:
        lines.append(
            f"### {display_name(result.method)} ({result.status}): **{result.verdict}**, score {result.score:.3f}"
            + (f" (threshold {result.threshold:.2f})" if result.gives_verdict else "")
        )
        if not result.gives_verdict:
            lines.append(f"- {NO_VERDICT_ADVICE}")
        block = (made_by or {}).get(result.method)
        if block is not None:
            lines.append(f"- made by {escaped(short_form(block))}")
            if noise_warning(block):
                lines.append(f"- ⚠️ {escaped(noise_warning(block))}")
        if result.status != "trained":
            lines.append(f"- {UNTRAINED_MAP_NOTE}")
        lines.append(f"- {reference_line(result, (profiles or {}).get(result.method))}")
        if result.note:
            lines.append(f"- ⚠️ {escaped(result.note)}")
        if result.tiles:
            lines.append(f"- scored at full resolution in {result.tiles} tiles (score: the highest tile's)")
        if isinstance(result.details, GenCLIPImageDetails):
            lines.append(f"- {class_name_filter_decision(result.details.class_name)}")
        lines.extend(f"- {key}: {escaped(json.dumps(value))}" for key, value in result.details_dict().items())
    if duplicates:
        lines.append(f"\n⚠️ {len(duplicates)} reference image{'s' if len(duplicates) != 1 else ''} left out: the same content as "
                     f"another reference ({', '.join(escaped(name) for name in duplicates)}); calibration used distinct images only.")
    total = sum(result.seconds for result in results)
    lines.append(f"\nClass name used: “{escaped(results[0].class_name)}” · request took {total:.2f} s")
    return "\n".join(lines)


def reference_line(result: Detection, profile: ProductProfile | None) -> str:
    """Where the verdict's thresholds come from and the false-alarm rate they promise, e.g. "4 reference images of good
    parts; calibrated on 4 good images: at most 1 in 5 good parts flagged; image threshold 0.632, pixel threshold
    0.661 (leave-one-out: 0 of 4 references flagged)"."""
    if profile is None:
        return f"No reference images (zero-shot); {result.calibration}"
    line = f"{profile.num_references} reference image{'s' if profile.num_references != 1 else ''} of good parts; {result.calibration}"
    if profile.calibration is None:
        return line + " (calibration needs at least two distinct reference images)"
    calibration = profile.calibration
    flagged = round(calibration.false_alarm_rate() * calibration.num_good)
    return (f"{line}; image threshold {calibration.image_threshold:.3f}, pixel threshold {calibration.pixel_threshold:.3f} "
            f"(leave-one-out: {flagged} of {calibration.num_good} references flagged)")


def class_name_filter_decision(choice: ClassNameChoice) -> str:
    """GenCLIP's class name filtering (CNF) decision for one image as a sentence."""
    evidence = f" (CLIP probability {choice.probability:.2f})" if choice.probability is not None else ""
    given, used = escaped(choice.name_given), escaped(choice.name_used)
    if choice.kept:
        return f"Class name filter ({choice.mode}): kept “{given}”{evidence}"
    return f"Class name filter ({choice.mode}): “{given}” does not fit the image{evidence}; used “{used}”"


def anomalous_percent(result: Detection) -> float:
    return round(100.0 * float(result.mask.mean()), 2)


def table_row(result: Detection) -> list:
    return [
        display_name(result.method),
        result.status,
        round(result.score, 4),
        result.verdict,
        anomalous_percent(result),
        round(result.seconds, 3),
        json.dumps(result.details_dict()) if result.details is not None else "",
    ]


def gallery(results: list[Detection]) -> list:
    items = []
    for result in results:
        name = display_name(result.method)
        items.append((result.overlay, f"{name}: {scored_caption(result)}"))
        items.append((result.mask_image(), f"{name}: mask at {result.mask_threshold:.2f}"))
    return items


def scored_caption(result: Detection) -> str:
    """The score, and the verdict where there is one."""
    return f"{result.score:.3f} {result.verdict}" if result.gives_verdict else f"{result.score:.3f}"


def batch_summary(rows: list[list], method: str, status: str, threshold: float | None, seconds: float,
                  notes: Sequence[str] = ()) -> str:
    """rows: [file, score, verdict, anomalous %, mask file, error] (score None for a row not scored); ``threshold``:
    the verdicts' (None: no verdict, ``BATCH_NO_VERDICT_ADVICE``); ``notes``: lines of zsad's own (mutual scoring's)
    shown under the heading."""
    scored = [row for row in rows if row[1] is not None]
    anomalous = sum(row[2] == "anomalous" for row in scored)
    heading = (f"### {anomalous} of {len(scored)} images anomalous at threshold {threshold:.2f}" if threshold is not None
               else f"### {len(scored)} images scored: no verdict (sort by score to rank them)")
    lines = [
        heading,
        f"{display_name(method)} ({status}) · {len(rows)} files in {seconds:.1f} s",
        *([] if threshold is not None else [f"- {BATCH_NO_VERDICT_ADVICE}"]),
        *(f"- {note}" for note in notes),
    ]
    lines += [f"- {escaped(row[0])}: {row[2]}: {escaped(row[5])}" for row in rows if row[1] is None]
    return "\n".join(lines)


PRODUCT_LABEL = "Product name"


def product_label(detector: AnomalyDetector, method: str) -> str:
    """The product-name box's label for ``method`` (or compare): marked optional where no prompt of it names the
    product (e.g. AnomalyCLIP's object-agnostic prompts)."""
    if detector.names_the_product(None if method == COMPARE else method):
        return PRODUCT_LABEL
    return f"{PRODUCT_LABEL} (optional: {display_name(method)}'s prompts name no product)"


def method_choices(detector: AnomalyDetector, compare: bool = True) -> list[tuple[str, str]]:
    """(label, value) of every method, and "compare all" when asked for and there are several."""
    choices = [(f"{display_name(name)} ({detector.status(name)})", name) for name in detector.method_names]
    return choices + [("compare all", COMPARE)] if compare and len(choices) > 1 else choices


def banner(detector: AnomalyDetector) -> str:
    """The notes above the page: a tiny random backbone (recognised wherever it came from: --tiny, or --clip of a
    `zsad tiny-clip` folder), untrained methods."""
    notes = []
    if is_tiny_random(detector.backbone.model.config):
        notes.append(
            "⚠️ **Tiny random CLIP** (`--tiny`, or `--clip` of a `zsad tiny-clip` folder): scores and maps are noise. "
            "This mode is for UI work only; start with `--clip PATH` of a real CLIP (or the default) for real results."
        )
    untrained = [name for name in detector.method_names if detector.status(name) == "untrained"]
    if untrained:
        variables = " / ".join(f"`{checkpoint_variable(name)}`" for name in untrained)
        notes.append(
            f"ℹ️ **{', '.join(map(display_name, untrained))}: untrained** (no checkpoint configured; training-free "
            f"start from CLIP). Set {variables} or `--checkpoint METHOD=PATH` to use trained weights."
        )
    return "\n\n".join(notes)


def runtime(detector: AnomalyDetector) -> str:
    """Where the models run, e.g. "Runs on CPU · vision tower in bfloat16, text in bfloat16 · vision
    pass: torch bfloat16"."""
    device = detector.device
    where = f"GPU {device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type.upper()
    vision, text = (str(dtype).removeprefix("torch.") for dtype in (detector.backbone.dtype, detector.backbone.text_dtype))
    return f"Runs on {where} · vision tower in {vision}, text in {text} · vision pass: {detector.engine.describe()}"
