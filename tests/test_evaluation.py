"""The evaluation protocol on a tiny CLIP and a synthetic MVTec-layout dataset: metrics equal the metrics of
the recorded scores and maps, the three outputs are written (in process, by `zsad evaluate`, and by a
2-process `accelerate launch train/evaluate.py` that must agree with one process), and the JSON feeds the model card."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

import zsad
from zsad.cli import main
from zsad.data import read_mask
from zsad.data.synthetic import generate
from zsad.evaluation import evaluate, example_rows, figure_curves, write_outputs
from zsad.hub import load_evaluation, render_model_card
from zsad.metrics import METRICS
from zsad.visualize import evaluation_figure

from train_script import LOOPBACK_ENV, run_command

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("eval-data"), categories=["tile", "capsule"], num_good=3, num_defective=3,
                    image_size=72, num_train_good=0)


@pytest.fixture(scope="module")
def evaluated(tiny_clip_path, tiny_backbone, dataset_root):
    model = zsad.ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=IMAGE_SIZE)
    return evaluate(model, "mvtec", dataset_root, batch_size=4)


def test_report_holds_the_metrics_of_the_recorded_scores_and_maps(evaluated):
    report, records = evaluated
    assert len(records) == 12 and set(report["categories"]) == {"tile", "capsule"}
    for category, metrics in report["categories"].items():
        chosen = [r for r in records if r.sample.category == category]
        labels = [r.sample.label for r in chosen]
        assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, [r.score for r in chosen]))
        # Pixel AUROC at native size: each 56x56 map resized bilinearly to the 72x72 mask.
        masks = [read_mask(r.sample) for r in chosen]
        maps = [F.interpolate(torch.from_numpy(r.anomaly_map.astype(np.float32))[None, None], size=(72, 72), mode="bilinear")
                .numpy().astype(np.float16).ravel() for r in chosen]
        expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate(maps).astype(np.float64))
        assert metrics["pixel_auroc"] == pytest.approx(expected, abs=1e-9)
        assert set(metrics) == set(METRICS) and all(0.0 <= v <= 1.0 for v in metrics.values())
    for key in METRICS:
        assert report["mean"][key] == pytest.approx(np.mean([m[key] for m in report["categories"].values()]))


def test_outputs_are_written_and_feed_the_model_card(evaluated, tmp_path):
    report, records = evaluated
    paths = write_outputs(report, records, tmp_path)
    assert json.loads(paths["json"].read_text())["mean"] == report["mean"]
    table = paths["markdown"].read_text()
    assert f"| tile | {100 * report['categories']['tile']['image_auroc']:.1f} |" in table and "**mean**" in table
    with Image.open(paths["figure"]) as figure:
        assert figure.width > 500 and figure.height > 500
    (parsed,) = load_evaluation(paths["json"])
    assert parsed.mean == pytest.approx(report["mean"])
    config = zsad.ZeroShotCLIPConfig()  # training-free baseline: results allowed without training
    card = str(render_model_card(config, paths["json"]))
    assert f"{100 * report['mean']['pixel_aupro']:.1f}" in card


def test_figure_has_image_and_pixel_curves_per_category(evaluated, tmp_path):
    report, records = evaluated
    curves = figure_curves(records)
    figure = evaluation_figure(example_rows(records), curves, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 0
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_title()}
    for level in ("Image", "Pixel"):
        for kind in ("ROC", "precision-recall"):
            assert [line.get_label() for line in panels[f"{level} {kind}"].lines] == ["capsule", "tile"]
    for category, metrics in report["categories"].items():
        # The drawn pixel ROC is the exact curve the reported pixel AUROC integrates.
        line = next(line for line in panels["Pixel ROC"].lines if line.get_label() == category)
        assert np.trapezoid(line.get_ydata(), line.get_xdata()) == pytest.approx(metrics["pixel_auroc"])
        assert np.trapezoid(curves["Image"][category].tpr, curves["Image"][category].fpr) == pytest.approx(metrics["image_auroc"])


def test_cli_evaluate_writes_the_three_outputs(tiny_clip_path, dataset_root, tmp_path, capsys):
    code = main(["evaluate", "--model", "baseline", "--clip", str(tiny_clip_path), "--image-size", str(IMAGE_SIZE),
                 "--dataset", "mvtec", "--root", str(dataset_root), "--categories", "tile", "--output-dir", str(tmp_path)])
    assert code == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"evaluation.json", "evaluation.md", "evaluation.png"}
    assert list(json.loads((tmp_path / "evaluation.json").read_text())["categories"]) == ["tile"]
    assert "I-AUROC" in capsys.readouterr().out


def test_cli_evaluate_names_a_broken_dataset(tiny_clip_path, tmp_path, capsys):
    (tmp_path / "bottle" / "test").mkdir(parents=True)
    code = main(["evaluate", "--model", "baseline", "--clip", str(tiny_clip_path), "--dataset", "mvtec",
                 "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2 and "No images in" in capsys.readouterr().err


def test_two_process_run_agrees_with_one_process(two_process_launcher, tiny_clip_path, dataset_root, evaluated, tmp_path):
    run_command([*two_process_launcher(), str(REPO / "train" / "evaluate.py"), "--model", "baseline", "--clip", str(tiny_clip_path),
                 "--image-size", str(IMAGE_SIZE), "--dataset", "mvtec", "--root", str(dataset_root), "--batch-size", "4",
                 "--out", str(tmp_path)], extra_env={**LOOPBACK_ENV, "ACCELERATE_USE_CPU": "true"})
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["num_images"] == 12 and report["num_processes"] == 2
    for category, metrics in evaluated[0]["categories"].items():
        assert report["categories"][category] == pytest.approx(metrics, abs=1e-6)


def test_tiled_evaluation_records_the_tiled_detection_of_each_image(tiny_clip_path, tiny_backbone, dataset_root):
    from zsad.evaluation import native_map
    from zsad.inference import AnomalyDetector

    model = zsad.ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=IMAGE_SIZE)
    report, records = evaluate(model, "mvtec", dataset_root, categories=["tile"], batch_size=4, tiles=True)
    assert report["tiles"] is True and len(records) == 6
    detector = AnomalyDetector(tiny_backbone, {"baseline": model})
    for record in records[:2]:
        tiled = detector.detect_tiled(record.sample.image_path, "tile")
        assert tiled.tiles == 4  # 72 px images, 56 px windows: two per side
        assert record.score == pytest.approx(tiled.score, abs=1e-6)
        np.testing.assert_array_equal(record.anomaly_map, native_map(tiled.anomaly_map, (IMAGE_SIZE, IMAGE_SIZE)))
