"""Heat-map overlays and result figures."""

from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from PIL import Image

if TYPE_CHECKING:  # metrics imports scikit-learn and SciPy, which the serving path does not need
    from matplotlib.figure import Figure

    from ..metrics import Curves


def overlay_heatmap(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """Blend a [0, 1] map (H, W) of the image's own size over the RGB image with a matplotlib colormap.

    Works in uint8 throughout (the colormap's own 256-entry table, PIL's blend): a float RGBA copy of a
    12-megapixel photo would take 400 MB, this takes 4 bytes per pixel.
    """
    table = colormaps[colormap]
    levels = np.minimum(np.clip(anomaly_map, 0.0, 1.0) * table.N, table.N - 1).astype(np.uint8)
    heat = Image.fromarray(table(levels, bytes=True)[..., :3])
    return Image.blend(image.convert("RGB"), heat, alpha)


def evaluation_figure(example_rows: dict[str, list[tuple]], curves: dict[str, dict[str, "Curves"]], path,
                      notes: dict[str, str] | None = None) -> "Figure":
    """One PNG: a row of ROC and PR curves per category for each level (image, pixel), then one row of overlays
    per example kind; returns the figure.

    ``example_rows``: {row title: [(title, PIL image, [0, 1] map (H, W), bool mask (H, W)), ...]};
    ``curves``: {level: {category: Curves}}, e.g. {"Image": ..., "Pixel": ...}; ``notes``: {level: text written
    on that level's curve panels}, e.g. which categories have no pixel curves because they have no masks.
    """
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no GUI backend or global state

    columns = max(2, max((len(row) for row in example_rows.values()), default=0))
    rows = len(curves) + len(example_rows)
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for row_axes, (level, level_curves) in zip(axes, curves.items()):
        _plot_curves(row_axes[0], row_axes[1], level, level_curves, (notes or {}).get(level))
        for axis in row_axes[2:]:
            axis.axis("off")
    for row_axes, (row_title, examples) in zip(axes[len(curves):], example_rows.items()):
        _plot_examples(row_axes, row_title, examples)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return figure


def _plot_curves(roc_axis, pr_axis, level: str, curves: dict[str, "Curves"], note: str | None = None) -> None:
    for axis in (roc_axis, pr_axis) if note else ():
        axis.text(0.5, 0.5, note, ha="center", va="center", fontsize=7, wrap=True, transform=axis.transAxes)
    for category, curve in curves.items():
        roc_axis.plot(curve.fpr, curve.tpr, label=category)
        pr_axis.plot(curve.recall, curve.precision, label=category)
    roc_axis.set(title=f"{level} ROC", xlabel="false-positive rate", ylabel="true-positive rate")
    pr_axis.set(title=f"{level} precision-recall", xlabel="recall", ylabel="precision")
    if roc_axis.lines:
        roc_axis.legend(fontsize=7)


def _plot_examples(row_axes, row_title: str, examples: list[tuple]) -> None:
    for axis in row_axes:
        axis.axis("off")
    for axis, (title, image, anomaly_map, mask) in zip(row_axes, examples):
        axis.imshow(overlay_heatmap(image, anomaly_map))
        if mask.any():
            axis.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        axis.set_title(f"{row_title}\n{title}", fontsize=8)


def few_shot_figure(zero_shot: dict, few_shot: dict, path) -> "Figure":
    """Bars per metric: the zero-shot mean and the few-shot mean over seeds with its standard deviation."""
    from matplotlib.figure import Figure

    from ..metrics import metric_name

    keys = [key for key in few_shot["mean"] if few_shot["mean"][key] is not None and zero_shot.get(key) is not None]
    positions = np.arange(len(keys))
    figure = Figure(figsize=(1.2 * len(keys) + 2, 3.6))
    axis = figure.subplots()
    axis.bar(positions - 0.2, [zero_shot[key] for key in keys], width=0.4, label="zero-shot")
    axis.bar(positions + 0.2, [few_shot["mean"][key] for key in keys], width=0.4, yerr=[few_shot["std"][key] for key in keys],
             capsize=3, label=f"{few_shot['shots']}-shot (mean ± std, {len(few_shot['seeds'])} seeds)")
    axis.set_xticks(positions, [metric_name(key, short=True) for key in keys])
    axis.set(ylim=(0, 1), ylabel="mean over categories")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return figure


def loss_curve_figure(rows: list[dict], path, title: str) -> "Figure":
    """Training loss per step and its mean per epoch (``rows``: dicts with "epoch", "global_step", "loss")."""
    from matplotlib.figure import Figure

    steps = [int(row["global_step"]) for row in rows]
    losses = [float(row["loss"]) for row in rows]
    epochs = sorted({int(row["epoch"]) for row in rows})
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    axis.plot(steps, losses, linewidth=1, alpha=0.6, label="loss per step")
    epoch_ends = [max(s for s, row in zip(steps, rows) if int(row["epoch"]) == e) for e in epochs]
    epoch_means = [np.mean([loss for loss, row in zip(losses, rows) if int(row["epoch"]) == e]) for e in epochs]
    axis.plot(epoch_ends, epoch_means, marker="o", label="epoch mean")
    axis.set(xlabel="step", ylabel="training loss", title=title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure
