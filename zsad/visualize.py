"""Heat-map overlays and result figures."""

import numpy as np
from matplotlib import colormaps
from PIL import Image


def overlay_heatmap(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """Blend a [0, 1] map (H, W) of the image's own size over the RGB image with a matplotlib colormap.

    Works in uint8 throughout (the colormap's own 256-entry table, PIL's blend): a float RGBA copy of a
    12-megapixel photo would take 400 MB, this takes 4 bytes per pixel.
    """
    table = colormaps[colormap]
    levels = np.minimum(np.clip(anomaly_map, 0.0, 1.0) * table.N, table.N - 1).astype(np.uint8)
    heat = Image.fromarray(table(levels, bytes=True)[..., :3])
    return Image.blend(image.convert("RGB"), heat, alpha)


def evaluation_figure(example_rows: dict[str, list[tuple]], curves: dict[str, tuple], path) -> None:
    """One PNG: image-level ROC and PR curves per category, then one row of overlays per example kind.

    ``example_rows``: {row title: [(title, PIL image, [0, 1] map (H, W), bool mask (H, W)), ...]};
    ``curves``: {category: (labels, scores)}.
    """
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no GUI backend or global state

    columns = max(2, max((len(row) for row in example_rows.values()), default=0))
    figure = Figure(figsize=(3.2 * columns, 3.2 * (1 + len(example_rows))))
    axes = figure.subplots(1 + len(example_rows), columns, squeeze=False)
    _plot_curves(axes[0][0], axes[0][1], curves)
    for axis in axes[0][2:]:
        axis.axis("off")
    for row_axes, (row_title, examples) in zip(axes[1:], example_rows.items()):
        for axis in row_axes:
            axis.axis("off")
        for axis, (title, image, anomaly_map, mask) in zip(row_axes, examples):
            axis.imshow(overlay_heatmap(image, anomaly_map))
            if mask.any():
                axis.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
            axis.set_title(f"{row_title}\n{title}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _plot_curves(roc_axis, pr_axis, curves: dict[str, tuple]) -> None:
    from sklearn.metrics import precision_recall_curve, roc_curve

    for category, (labels, scores) in curves.items():
        if len(set(labels)) < 2:  # curves need both classes
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        roc_axis.plot(fpr, tpr, label=category)
        pr_axis.plot(recall, precision, label=category)
    roc_axis.set(title="Image ROC", xlabel="false-positive rate", ylabel="true-positive rate")
    pr_axis.set(title="Image precision-recall", xlabel="recall", ylabel="precision")
    if roc_axis.lines:
        roc_axis.legend(fontsize=7)
