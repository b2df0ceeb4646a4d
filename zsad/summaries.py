"""What the ``zsad`` commands print when they finish: what was done, where the results are, what to do next.

Plain functions of their results (no model, no torch), so the texts are tested on their own and the commands stay thin.
"""

from collections.abc import Sequence
from pathlib import Path


def predict_summary(summary: dict, out_dir) -> str:
    """``zsad predict``'s closing lines from the ``scores.json`` summary ``predict_files`` returns."""
    scored = [record for record in summary["images"] if "error" not in record]
    out_dir = Path(out_dir).resolve()
    if not scored:
        return f"No image could be scored; the errors are in {out_dir / 'scores.json'}."
    scores = [record["score"] for record in scored]
    anomalous = sum(record["verdict"] == "anomalous" for record in scored)
    lines = [
        f"{len(scored)} image{'s' if len(scored) != 1 else ''} scored with {summary['method']} ({summary['status']}) as "
        f"'{summary['class_name']}': {anomalous} anomalous, {len(scored) - anomalous} normal at image threshold "
        f"{summary['threshold']:.3f} ({summary['calibration']}).",
        f"Image scores from {min(scores):.3f} to {max(scores):.3f}.",
        *([f"{len(summary['images']) - summary['reused']} scored now, {summary['reused']} reused from the interrupted run."]
          if summary.get("reused") else []),
        f"Overlays (*_overlay.png), masks (*_mask.png) and scores.json are in {out_dir}",
    ]
    if summary.get("mutual"):
        lines += mutual_lines([record["details"]["compared_with"] for record in scored], [record["note"] for record in scored])
    if all(record["anomalous_pixel_fraction"] >= 1.0 for record in scored):
        lines.append(
            f"Note: every mask is white: each pixel of each image reached the pixel threshold {summary['pixel_threshold']:.3f}, "
            "so the masks say nothing. Calibrate on images of good parts (zsad calibrate ... --out PROFILE, then "
            "zsad predict ... --profile PROFILE) or pass a higher --threshold."
        )
    return "\n".join(lines)


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
