"""zsad export and the torch-free runtime: parity of the exported graphs with the PyTorch models (tiny CLIP,
112 px), the deploy JSON, the CLI, and errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from zsad import AnomalyDetector, ZSADError, load_model
from zsad.deploy.export import ExportGraph, export
from zsad.deploy.runtime import CONFIG_NAME, ExportedDetector, read_processor
from zsad.detection.results import NO_VERDICT_LINE
from zsad_cli import main

from conftest import TEST_IMAGE_SIZE

NAMES = ["bottle", "metal nut"]
FP32_BOUNDS = (0.9999, 1e-4)
INT8_BOUNDS = (0.99, 0.01)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def tiny_model(method: str, backbone, **overrides):
    return load_model(method, backbone=backbone, image_size=TEST_IMAGE_SIZE, **overrides)


def pixels(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def assert_parity(model, folder, bounds, engine=None, seeds=(1, 2)):
    """Every name's score and map from the graph against the model's own forward, on random inputs."""
    detector = ExportedDetector.load(folder, engine=engine)
    min_pearson, max_difference = bounds
    for seed in seeds:
        x = pixels(seed)
        scores, maps = detector.scores_and_maps(x.numpy())
        assert scores.shape == (1, len(detector.class_names))
        assert maps.shape == (1, len(detector.class_names), TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
        for column, name in enumerate(detector.class_names):
            with torch.inference_mode():
                reference = model(x, class_names=[name])
            assert abs(float(reference.image_score[0]) - scores[0, column]) <= max_difference
            assert pearson(reference.anomaly_map[0].numpy(), maps[0, column]) >= min_pearson


@pytest.fixture(scope="module")
def baseline_onnx(tiny_backbone, tmp_path_factory):
    model = tiny_model("baseline", tiny_backbone)
    folder = tmp_path_factory.mktemp("baseline-onnx")
    export(model, NAMES, folder, format="onnx", precision="float32", threshold=0.3)
    return model, folder


def test_the_graph_is_traced_in_eval_mode(tiny_backbone):
    model = tiny_model("stackclip", tiny_backbone).train()
    graph = ExportGraph(model, NAMES)
    assert not graph.training and not any(module.training for module in graph.modules())


def test_exported_stackclip_matches_the_model(tiny_backbone, tmp_path):
    model = tiny_model("stackclip", tiny_backbone)
    export(model, NAMES, tmp_path, format="onnx")
    assert_parity(model, tmp_path, FP32_BOUNDS)


def test_exported_baseline_matches_the_model_for_every_name(baseline_onnx):
    model, folder = baseline_onnx
    assert_parity(model, folder, FP32_BOUNDS, seeds=(1, 2, 3))


def test_exported_genclip_matches_the_model_and_filters_class_names_inside_the_graph(tiny_backbone, tmp_path):
    """Hard CNF keeps or replaces the name per image; the graph must follow the image, not the trace example."""
    model = tiny_model("genclip", tiny_backbone, cnf_top_k=0, cnf_threshold=0.056)
    decisions = {}
    for seed in range(12):
        with torch.inference_mode():
            features = model.encode_image(pixels(seed))
            decisions[seed] = model.filter_class_names(["bottle"], features.image_embeds).kept[0]
    kept = [seed for seed, keep in decisions.items() if keep][:1]
    replaced = [seed for seed, keep in decisions.items() if not keep][:1]
    assert kept and replaced, f"the test needs images on both sides of the threshold: {decisions}"
    export(model, ["bottle"], tmp_path, format="onnx")
    assert_parity(model, tmp_path, FP32_BOUNDS, seeds=kept + replaced)


def vision_linears(model) -> int:
    """Linear layers an int8 vision graph runs: six per block, plus the value-value stream's out projection of each
    block from vv_attention_from on."""
    layers = model.config.num_vision_layers
    return 6 * layers + layers - model.config.vv_attention_from + 1


def test_int8_onnx_graph_quantises_only_the_vision_linears_and_stays_within_the_int8_bounds(tiny_backbone, tmp_path):
    import onnx

    model = tiny_model("baseline", tiny_backbone)
    export(model, NAMES, tmp_path, format="onnx", precision="int8")
    assert_parity(model, tmp_path, INT8_BOUNDS)
    operators = [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    # q, k, v, out, fc1, fc2 per block, and the value-value stream's out projection per block from vv_attention_from on
    assert operators.count("MatMulInteger") == vision_linears(model)


def test_an_export_of_format_version_1_reads_its_preprocessing_from_zsad_deploy_json(tmp_path):
    version_1 = {"zsad_deploy_version": 1, "image_size": 64, "resize": "bilinear", "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.25, 0.25, 0.25]}
    processor = read_processor(tmp_path, version_1)  # no preprocessor_config.json in the folder
    assert (processor.size, processor.resample, processor.image_mean, processor.image_std) == (64, "bilinear", (0.5,) * 3, (0.25,) * 3)


def test_openvino_float32_graph_and_openvino_running_the_onnx_graph(baseline_onnx, tiny_backbone, tmp_path):
    model, onnx_folder = baseline_onnx
    export(model, NAMES, tmp_path, format="openvino")
    assert (tmp_path / "model.xml").is_file() and (tmp_path / "model.bin").is_file()
    assert_parity(model, tmp_path, FP32_BOUNDS)
    assert_parity(model, onnx_folder, FP32_BOUNDS, engine="openvino")


def test_deploy_json_holds_names_and_thresholds_and_the_processor_file_the_preprocessing(baseline_onnx, tiny_backbone):
    _, folder = baseline_onnx
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["method"] == "baseline" and config["format"] == "onnx" and config["precision"] == "float32"
    assert not {"image_size", "image_mean", "image_std", "resize"} & set(config)  # said once, in preprocessor_config.json
    processor = read_processor(folder, config)
    assert processor.size == TEST_IMAGE_SIZE and processor.resample == "bicubic"
    assert processor.image_mean == tuple(tiny_backbone.image_mean) and processor.image_std == tuple(tiny_backbone.image_std)
    assert config["class_names"] == NAMES
    assert config["thresholds"]["metal nut"] == {"image": 0.3, "pixel": 0.3, "source": "uncalibrated (threshold 0.3 set by hand)"}
    assert config["references"] is None
    assert (folder / config["graph"]).is_file()


# torch and transformers cannot be imported in this process, as on a deployment machine without them.
RUN_WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = sys.modules["transformers"] = None
from zsad.deploy.runtime import ExportedDetector
result = ExportedDetector.load(sys.argv[1]).detect(sys.argv[2], "metal_nut")
loaded = [name for name in ("torch", "transformers") if sys.modules.get(name) is not None]
print(json.dumps({"torch": bool(loaded), "score": result.score, "verdict": result.verdict,
                  "threshold": result.threshold, "shape": list(result.anomaly_map.shape)}))
"""


def test_runtime_helper_runs_without_torch_and_agrees_with_the_detector(baseline_onnx, tiny_backbone, tmp_path):
    model, folder = baseline_onnx
    image = tmp_path / "part.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(image)
    completed = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, str(folder), str(image)],
                               capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    assert result["shape"] == [90, 130] and result["threshold"] == 0.3
    reference = AnomalyDetector(tiny_backbone, {"baseline": model}).detect(str(image), "metal nut", threshold=0.3)
    assert abs(result["score"] - reference.score) <= 1e-4
    assert result["verdict"] == reference.verdict
    in_process = ExportedDetector.load(folder).detect(str(image), "metal nut")
    assert pearson(in_process.anomaly_map, reference.anomaly_map) >= 0.9999


TORCH_NOT_INSTALLED = """import sys


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "accelerate"):
            raise ImportError(f"No module named '{name}' (hidden by the test)")
        return None


sys.meta_path.insert(0, NotInstalled())
from zsad_cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_cli_predict_with_an_exported_graph_runs_where_torch_is_not_installed(baseline_onnx, tmp_path):
    _, folder = baseline_onnx
    images = tmp_path / "images"
    images.mkdir()
    for index, shade in enumerate((40, 200)):
        Image.fromarray(np.full((48, 72, 3), shade, dtype=np.uint8)).save(images / f"{index}.png")
    out = tmp_path / "pred"
    completed = subprocess.run([sys.executable, "-c", TORCH_NOT_INSTALLED, "predict", str(images), "--engine", "onnx",
                                "--model", str(folder), "--class-name", "metal nut", "--out", str(out)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    summary = json.loads((out / "scores.json").read_text())
    assert summary["class_name"] == "metal nut" and summary["threshold"] == 0.3 and len(summary["images"]) == 2
    for record in summary["images"]:
        expected = ExportedDetector.load(folder).detect(record["image"], "metal nut")
        assert record["score"] == pytest.approx(expected.score) and record["verdict"] == expected.verdict
        mask = np.asarray(Image.open(out / record["mask"])) > 127
        np.testing.assert_array_equal(mask, expected.mask)


def test_cli_export_openvino_int8_then_predict_with_openvino_engine(tiny_clip_path, tiny_backbone, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--model", "baseline", "--clip", str(tiny_clip_path), "--image-size", str(TEST_IMAGE_SIZE),
                 "--class-name", "bottle", "--format", "openvino", "--precision", "int8", "--out", str(out)]) == 0
    assert_parity(tiny_model("baseline", tiny_backbone), out, INT8_BOUNDS)
    import openvino as ov

    int8_weights = [op for op in ov.Core().read_model(str(out / "model.xml")).get_ops()
                    if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert len(int8_weights) == vision_linears(tiny_model("baseline", tiny_backbone))
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.full((64, 80, 3), 120, dtype=np.uint8)).save(image)
    assert main(["predict", str(image.parent), "--engine", "openvino", "--model", str(out), "--out", str(tmp_path / "pred")]) == 0
    summary = json.loads((tmp_path / "pred" / "scores.json").read_text())
    assert summary["method"] == "baseline" and summary["class_name"] == "bottle" and summary["status"] == "training-free"
    # Exported without a threshold or profile: the training-free graph gives no verdict, and says how to get one.
    assert (summary["threshold"], summary["gives_verdict"], summary["verdict_line"]) == (None, False, NO_VERDICT_LINE)
    record = summary["images"][0]
    expected = ExportedDetector.load(out).detect(str(image))
    assert record["score"] == pytest.approx(expected.score) and record["verdict"] == expected.verdict == "none"
    assert Image.open(tmp_path / "pred" / record["mask"]).size == (80, 64)


def test_errors_say_what_to_do(baseline_onnx, tiny_backbone, tmp_path, monkeypatch, capsys):
    _, folder = baseline_onnx
    with pytest.raises(ZSADError, match="exported for"):
        ExportedDetector.load(folder).detect(np.zeros((32, 32, 3), dtype=np.uint8), "screw")
    with pytest.raises(ZSADError, match="Say which product"):
        ExportedDetector.load(folder).detect(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ZSADError, match="no zsad_deploy.json"):
        ExportedDetector.load(tmp_path)
    with pytest.raises(ZSADError, match="no profile.json|product profile"):
        export(tiny_model("baseline", tiny_backbone), ["bottle"], tmp_path / "p", profile=tmp_path)
    with pytest.raises(ZSADError, match="at least one --class-name"):
        export(tiny_model("baseline", tiny_backbone), [], tmp_path / "p")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(ZSADError, match=r"pip install -e '\.\[deploy\]'"):
        ExportedDetector.load(folder)
    existing_file = tmp_path / "not-a-folder"
    existing_file.write_text("")
    with pytest.raises(ZSADError, match="is a file; give a folder"):
        export(tiny_model("baseline", tiny_backbone), ["bottle"], existing_file)


def test_int8_precision_quantises_the_vision_linears_within_the_int8_bounds(tiny_clip_path):
    from zsad.runtime.loading import load_backbone, resolve_precision

    int8 = load_backbone(str(tiny_clip_path), dtype=resolve_precision("int8"))
    float32 = load_backbone(str(tiny_clip_path))
    quantised = [module for module in int8.model.vision_model.encoder.modules() if type(module).__name__ == "Linear"
                 and module.__module__.startswith("torch.ao.nn.quantized")]
    assert len(quantised) == 6 * int8.vision_config.num_hidden_layers
    assert int8.model.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32  # text side untouched
    x = pixels(5)
    with torch.inference_mode():
        quantised_output = tiny_model("baseline", int8)(x, class_names=["bottle"])
        reference = tiny_model("baseline", float32)(x, class_names=["bottle"])
    assert abs(float(quantised_output.image_score[0] - reference.image_score[0])) <= INT8_BOUNDS[1]
    assert pearson(quantised_output.anomaly_map.numpy(), reference.anomaly_map.numpy()) >= INT8_BOUNDS[0]


@pytest.fixture(scope="module")
def disk_profile(tiny_backbone, tmp_path_factory):
    """A calibrated baseline profile of the synthetic 'disk' (4 good references, 3 defective images with masks)."""
    from zsad.data import load_dataset
    from zsad.data.synthetic import generate

    root = generate(tmp_path_factory.mktemp("synthetic"), categories=["disk"], num_good=4, num_defective=3, image_size=64,
                    seed=0, num_train_good=4)
    detector = AnomalyDetector.load(clip=tiny_backbone, image_size=TEST_IMAGE_SIZE, methods=["baseline"])
    defective = [sample for sample in load_dataset("mvtec", root, categories=["disk"]) if sample.label]
    profile = detector.build_profile("baseline", "disk", root / "disk" / "train" / "good",
                                     [str(sample.image_path) for sample in defective], [str(sample.mask_path) for sample in defective])
    return detector, profile, defective


def test_a_profile_exports_its_references_and_calibrated_thresholds(disk_profile, tmp_path):
    detector, profile, defective = disk_profile
    model = detector.model("baseline")
    folder = profile.save(tmp_path / "profile")
    export(model, ["disk", "bottle"], tmp_path / "graph", format="onnx", profile=folder)
    config = json.loads((tmp_path / "graph" / CONFIG_NAME).read_text())
    calibration = profile.calibration
    assert config["thresholds"]["disk"] == {"image": calibration.image_threshold, "pixel": calibration.pixel_threshold,
                                            "source": calibration.describe()}
    assert config["thresholds"]["bottle"]["image"] == 0.5  # other names: no references, the default threshold
    assert config["references"]["class_name"] == "disk" and config["references"]["num_references"] == 4
    graph = ExportedDetector.load(tmp_path / "graph")
    verdicts_compared = 0
    for sample in defective:
        ours = detector.detect(sample.image_path, "disk", method="baseline", profile=profile)
        exported = graph.detect(sample.image_path, "disk")
        assert abs(exported.score - ours.score) <= 1e-4
        assert pearson(exported.anomaly_map, ours.anomaly_map) >= 0.9999
        assert (exported.threshold, exported.pixel_threshold) == (ours.threshold, ours.pixel_threshold)
        if abs(ours.score - ours.threshold) > 1e-4:  # calibration puts thresholds at calibration images' own scores
            assert exported.verdict == ours.verdict
            verdicts_compared += 1
        assert np.mean(exported.mask != ours.mask) < 0.01  # masks differ only where the map sits on the threshold
    assert verdicts_compared >= 1
    plain = detector.detect(defective[0].image_path, "bottle", method="baseline")
    assert abs(graph.detect(defective[0].image_path, "bottle").score - plain.score) <= 1e-4  # unfused column


def test_cli_exports_a_profile_without_naming_the_product_and_predict_reports_its_thresholds(disk_profile, tiny_clip_path, tmp_path):
    _, profile, defective = disk_profile
    folder = profile.save(tmp_path / "profile")
    assert main(["export", "--model", "baseline", "--clip", str(tiny_clip_path), "--image-size", str(TEST_IMAGE_SIZE),
                 "--profile", str(folder), "--format", "onnx", "--out", str(tmp_path / "graph")]) == 0
    assert main(["predict", str(defective[0].image_path), "--engine", "onnx", "--model", str(tmp_path / "graph"),
                 "--out", str(tmp_path / "pred")]) == 0
    summary = json.loads((tmp_path / "pred" / "scores.json").read_text())
    calibration = profile.calibration
    assert summary["class_name"] == "disk" and summary["calibration"] == calibration.describe()
    assert (summary["threshold"], summary["pixel_threshold"]) == (calibration.image_threshold, calibration.pixel_threshold)


def test_a_profile_for_another_product_or_method_is_refused(disk_profile, tiny_backbone, tmp_path):
    _, profile, _ = disk_profile
    with pytest.raises(ZSADError, match="add --class-name 'disk'"):
        export(tiny_model("baseline", tiny_backbone), ["bottle"], tmp_path / "a", profile=profile)
    with pytest.raises(ZSADError, match="built for the method 'baseline', not 'stackclip'"):
        export(tiny_model("stackclip", tiny_backbone), ["disk"], tmp_path / "b", profile=profile)


@pytest.mark.parametrize(("method", "trained", "gives_verdict"),
                         [("baseline", False, False), ("stackclip", False, False), ("stackclip", True, True)])
def test_an_exported_graph_gives_verdicts_where_its_method_status_says_a_threshold_means_something(
        tiny_backbone, tmp_path, method, trained, gives_verdict):
    """The status ``zsad export`` recorded decides, as for the loaded model: an untrained or training-free graph gives
    no verdict at the default threshold, and one at a threshold the user sets (at export or per call)."""
    model = tiny_model(method, tiny_backbone)
    model.config.is_trained = trained
    export(model, ["bottle"], tmp_path / "graph", format="onnx")
    export(model, ["bottle"], tmp_path / "set", format="onnx", threshold=0.3)
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    graph = ExportedDetector.load(tmp_path / "graph")
    expected = AnomalyDetector(tiny_backbone, {method: model}).detect(image, "bottle", method=method)
    default = graph.detect(image, "bottle")
    assert graph.status == expected.status == ("trained" if trained else "training-free" if method == "baseline" else "untrained")
    assert (default.gives_verdict, default.verdict == "none", default.is_anomalous is None) == (
        gives_verdict, not gives_verdict, not gives_verdict)
    assert default.verdict == expected.verdict and default.verdict_line == expected.verdict_line
    assert (default.verdict_line == NO_VERDICT_LINE) is not gives_verdict
    for chosen in (graph.detect(image, "bottle", threshold=0.3), ExportedDetector.load(tmp_path / "set").detect(image, "bottle")):
        assert chosen.gives_verdict and chosen.verdict == ("anomalous" if chosen.score >= 0.3 else "normal")


def test_a_graph_exported_before_statuses_were_recorded_keeps_its_verdicts(baseline_onnx, tmp_path):
    _, folder = baseline_onnx
    old = tmp_path / "old"
    old.mkdir()
    for path in folder.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((old / CONFIG_NAME).read_text())
    config["thresholds"] = {name: {"image": 0.5, "pixel": 0.5, "source": "uncalibrated (threshold 0.5)"} for name in NAMES}
    del config["provenance"]
    (old / CONFIG_NAME).write_text(json.dumps(config))
    result = ExportedDetector.load(old).detect(np.zeros((32, 32, 3), dtype=np.uint8), "bottle")
    assert result.status == "exported (status not recorded)" and result.verdict in ("anomalous", "normal")
