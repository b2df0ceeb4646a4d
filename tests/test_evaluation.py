"""The evaluation protocol on a tiny CLIP and a synthetic MVTec-layout dataset: metrics equal the metrics of
the recorded scores and maps, the three outputs are written (in process, by `zsad evaluate`, and by a
2-process `accelerate launch train/evaluate.py` that must agree with one process), and the JSON feeds the model card."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

import zsad
from zsad.data import read_mask
from zsad.data.synthetic import generate
from zsad.detection.visualize import evaluation_figure
from zsad.evaluation.protocol import evaluate, example_rows, figure_curves, write_outputs
from zsad.evaluation.reports import load_evaluation
from zsad.hub.publish import render_model_card
from zsad.metrics import IMAGE_METRICS, METRICS, PIXEL_METRICS
from zsad_cli import main

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
                 "--precision", "float32", "--out", str(tmp_path)], extra_env={**LOOPBACK_ENV, "ACCELERATE_USE_CPU": "true"})
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["num_images"] == 12 and report["num_processes"] == 2
    for category, metrics in evaluated[0]["categories"].items():
        assert report["categories"][category] == pytest.approx(metrics, abs=1e-6)


def test_a_saved_hf_dataset_gives_the_metrics_of_its_folder_layout(evaluated, tiny_clip_path, tiny_backbone, dataset_root,
                                                                   tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    zsad.data.to_hf_dataset("mvtec", dataset_root).save_to_disk(tmp_path / "saved")
    model = zsad.ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=IMAGE_SIZE)
    report, records = evaluate(model, f"hf-disk:{tmp_path / 'saved'}", batch_size=4)
    assert len(records) == 12
    assert report["categories"] == evaluated[0]["categories"] and report["mean"] == evaluated[0]["mean"]  # equal, not close
    assert "notes" not in report


def test_cli_names_the_columns_of_an_hf_dataset(tiny_clip_path, dataset_root, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    zsad.data.to_hf_dataset("mvtec", dataset_root, categories=["tile"]).save_to_disk(tmp_path / "saved")
    code = main(["evaluate", "--model", "baseline", "--clip", str(tiny_clip_path), "--dataset", f"hf-disk:{tmp_path / 'saved'}",
                 "--image-column", "photo", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no column 'photo' (--image-column); its columns are ['image', 'mask', 'label', 'category', 'defect_type']" in capsys.readouterr().err


def test_folders_without_masks_give_image_metrics_and_say_why_pixel_metrics_are_missing(tiny_clip_path, tiny_backbone,
                                                                                         dataset_root, tmp_path, monkeypatch):
    # "tile": normal images in Nominal/ with masks/; "capsule": normal images in pass/, defects without masks.
    for category, normal, with_masks in (("tile", "Nominal", True), ("capsule", "pass", False)):
        test = dataset_root / category / "test"
        for folder in test.iterdir():
            target = tmp_path / "parts" / category / (normal if folder.name == "good" else folder.name)
            shutil.copytree(folder, target)
            if with_masks and folder.name != "good":
                shutil.copytree(dataset_root / category / "ground_truth" / folder.name, tmp_path / "parts" / category / "masks" / folder.name)
    figures = []
    monkeypatch.setattr("zsad.evaluation.protocol.evaluation_figure", lambda *args, **kwargs: figures.append(evaluation_figure(*args, **kwargs)))
    model = zsad.ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=IMAGE_SIZE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_outputs(*evaluate(model, "folder", tmp_path / "parts", batch_size=4), tmp_path / "out")
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]  # no NaN warnings
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["notes"] == {"capsule": "pixel metrics not available (no masks)"}
    capsule, tile = report["categories"]["capsule"], report["categories"]["tile"]
    assert all(capsule[key] is None for key in PIXEL_METRICS) and all(capsule[key] is not None for key in IMAGE_METRICS)
    assert all(report["mean"][key] == tile[key] for key in PIXEL_METRICS)  # the mean leaves capsule out
    table = (tmp_path / "out" / "evaluation.md").read_text()
    assert "| capsule | " + " | ".join(f"{100 * capsule[key]:.1f}" for key in IMAGE_METRICS) + " | n/a | n/a | n/a | n/a |" in table
    assert "n/a: capsule: pixel metrics not available (no masks)" in table
    texts = [text.get_text() for axis in figures[0].axes for text in axis.texts]
    assert texts == ["capsule: pixel metrics not available (no masks)"] * 2  # on the pixel ROC and PR panels


def test_tiled_evaluation_records_the_tiled_detection_of_each_image(tiny_clip_path, tiny_backbone, dataset_root):
    from zsad import AnomalyDetector
    from zsad.evaluation.protocol import native_map

    model = zsad.ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=IMAGE_SIZE)
    report, records = evaluate(model, "mvtec", dataset_root, categories=["tile"], batch_size=4, tiles=True)
    assert report["tiles"] is True and len(records) == 6
    detector = AnomalyDetector(tiny_backbone, {"baseline": model})
    for record in records[:2]:
        tiled = detector.detect_tiled(record.sample.image_path, "tile")
        assert tiled.tiles == 4  # 72 px images, 56 px windows: two per side
        assert record.score == pytest.approx(tiled.score, abs=1e-6)
        np.testing.assert_array_equal(record.anomaly_map, native_map(tiled.anomaly_map, (IMAGE_SIZE, IMAGE_SIZE)))
