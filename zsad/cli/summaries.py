"""What the ``zsad`` commands print when they finish: what was done, where the results are, what to do next.

Plain functions of their results (no model, no torch), so the texts are tested on their own and the commands stay thin.
"""

from collections.abc import Sequence
from pathlib import Path

from ..runtime.provenance import noise_warning, short_form


def ranking(records: list[dict], shown: int = 3) -> str:
    """The ``shown`` highest-scoring images, "name (0.612), ...": the rank is there with or without a verdict."""
    top = sorted(records, key=lambda record: record["score"], reverse=True)[:shown]
    return ", ".join(f"{Path(record['image']).name} ({record['score']:.3f})" for record in top)


def predict_summary(summary: dict, out_dir) -> str:
    """``zsad predict``'s closing lines from the ``scores.json`` summary ``predict_files`` returns."""
    scored = [record for record in summary["images"] if "error" not in record]
    out_dir = Path(out_dir).resolve()
    if not scored:
        return f"No image could be scored; the errors are in {out_dir / 'scores.json'}."
    scores = [record["score"] for record in scored]
    anomalous = sum(record["verdict"] == "anomalous" for record in scored)
    block = summary["provenance"]
    outcome = f"{anomalous} anomalous, {len(scored) - anomalous} normal at {summary['verdict_line']}" \
        if summary["gives_verdict"] else f"{summary['verdict_line']}"
    lines = [
        f"{len(scored)} image{'s' if len(scored) != 1 else ''} scored with {short_form(block)} as "
        f"'{summary['class_name']}'{renamed(block)}: {outcome}.",
        f"Image scores from {min(scores):.3f} to {max(scores):.3f}; highest first: {ranking(scored)}.",
        *([f"{len(summary['images']) - summary['reused']} scored now, {summary['reused']} reused from the interrupted run."]
          if summary.get("reused") else []),
        f"Overlays (*_overlay.png), masks (*_mask.png) and scores.json are in {out_dir}",
    ]
    if summary.get("vision_engine"):
        lines.append(f"Vision pass: {summary['vision_engine']}")
    if noise_warning(block):
        lines.append(noise_warning(block))
    if summary.get("mutual"):
        lines += mutual_lines([record["details"]["compared_with"] for record in scored], [record["note"] for record in scored])
    if all(record["anomalous_pixel_fraction"] >= 1.0 for record in scored):
        lines.append(
            f"Note: every mask is white: each pixel of each image reached the pixel threshold {summary['pixel_threshold']:.3f}, "
            "so the masks say nothing. Calibrate on images of good parts (zsad calibrate ... --out PROFILE, then "
            "zsad predict ... --profile PROFILE) or pass a higher --threshold."
        )
    return "\n".join(lines)


def calibrate_summary(profile, out_dir, previous=None) -> str:
    """``zsad calibrate``'s closing lines: the profile, its thresholds and the false-alarm rate they promise, the
    measured share of the good images flagged leave-one-out, and (``--add``) what the added references changed."""
    lines = [f"Profile of '{profile.class_name}' for {profile.method}: {profile.describe()}"]
    if previous is not None:
        before = previous.calibration.rate_statement() if previous.calibration else "uncalibrated"
        lines.append(f"Added {profile.num_references - previous.num_references} good images to the {previous.num_references} "
                     f"references; before: {before}")
    calibration = profile.calibration
    if calibration is None:
        lines.append("Thresholds: uncalibrated (0.5); give at least two good images to calibrate.")
    else:
        asked = f", false-alarm rate {calibration.false_alarm_target:g} asked" if calibration.false_alarm_target is not None else ""
        lines.append(f"Thresholds ({calibration.rule}{asked}): image {calibration.image_threshold:.4f}, "
                     f"pixel {calibration.pixel_threshold:.4f}")
        lines.append(f"Measured on the good images (leave-one-out): {calibration.false_alarm_rate():.1%} flagged "
                     f"({round(calibration.false_alarm_rate() * calibration.num_good)} of {calibration.num_good})")
        if calibration.false_alarm_bound is not None:
            lines.append(f"Guaranteed for new good parts from the same process: {calibration.rate_statement()} "
                         f"({calibration.false_alarm_bound:.1%})")
    lines.append(f"Saved to {Path(out_dir)}")
    return "\n".join(lines)


def renamed(block: dict) -> str:
    """" (given as 'Metal-Nut')" when the product name used is not the one given."""
    given = block["product"]["given"]
    return f" (given as '{given}')" if given is not None and given != block["product"]["used"] else ""


def mutual_lines(compared: Sequence[int], notes: Sequence[str | None]) -> list[str]:
    """How many images each mutually scored image was compared with, and the notes on images unlike the others (one
    line when the whole batch does not look like one product)."""
    low, high = min(compared), max(compared)
    counts = f"{low}" if low == high else f"{low} to {high}"
    lines = [f"Scored against each other: each image was compared with {counts} other images (no text, no references needed)."]
    given = [note for note in notes if note]
    if given and len(given) == len(notes) and len(set(given)) == 1:
        lines.append(f"Note: {given[0]}")
    elif given:
        lines.append(f"Note: {len(given)} image{'s look' if len(given) != 1 else ' looks'} unlike the others; see their notes.")
    return lines


def tiny_clip_summary(directory) -> str:
    """``zsad tiny-clip``'s closing lines: what was written and how to use it."""
    directory = Path(directory).resolve()
    files = ", ".join(sorted(path.name for path in directory.iterdir() if path.is_file()))
    return (
        f"Wrote a tiny random CLIP (4 vision layers, width 48, random weights: its maps mean nothing) to {directory}: {files}\n"
        f"Use it for offline tests and UI work wherever a CLIP is asked for, e.g.\n"
        f"  zsad predict IMAGE --model baseline --clip {directory} --class-name bottle --image-size 112 --out predictions\n"
        f"  python app.py --clip {directory}"
    )


def dry_run_summary(directory, repo_id: str) -> str:
    """``zsad publish --dry-run``'s closing lines: the files and the repo a real run would upload them to."""
    directory = Path(directory).resolve()
    files = sorted(path for path in directory.iterdir() if path.is_file())
    size = sum(path.stat().st_size for path in files)
    listing = "\n".join(f"  {path.name} ({path.stat().st_size:,} bytes)" for path in files)
    return (
        f"Dry run: nothing was uploaded. A real run would create the model repo https://huggingface.co/{repo_id} (if absent) "
        f"and upload in one commit these {len(files)} files ({size:,} bytes), written to {directory}:\n{listing}\n"
        f"Read the model card first: {directory / 'README.md'}"
    )
