"""The vision engines (zsad.runtime.engine, zsad.runtime.engine_choice) on the tiny CLIP: the OpenVINO graph gives torch's features and
maps within the bound docs/PERFORMANCE.md states, its cache is never used damaged and survives concurrent builders, and
auto records its measured choice."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TEST_IMAGE_SIZE, random_pixels, tiny_model

pytest.importorskip("openvino")

from zsad import (
    AnomalyDetector,  # noqa: E402
    ZSADError,  # noqa: E402
)
from zsad.runtime.engine import (  # noqa: E402
    GRAPH_FILES,
    MANIFEST,
    OpenVINOEngine,
    TorchEngine,
    cached_graph,
    calibration_pixels,
    covers,
    graph_fingerprint,
)
from zsad.runtime.engine_choice import FIDELITY_FLOOR, MeasuredEngine, features_pearson, vision_engine, write_choice  # noqa: E402

STREAMS = {None: [1, 2], 3: [3, 4]}  # stock tokens and a value-value stream from block 3, as AnomalyCLIP reads them
# The float32 route's bound (docs/PERFORMANCE.md): map Pearson and image-score difference against torch float32.
FLOAT32_MAP_PEARSON, FLOAT32_SCORE_DIFFERENCE = 0.99999, 1e-4


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def openvino_engine(tiny_backbone, engine_cache):
    return OpenVINOEngine(tiny_backbone, engine_cache)


def test_openvino_features_equal_torch_float32(tiny_backbone, openvino_engine):
    pixels = random_pixels(3)
    ours = openvino_engine.encode_streams(pixels, STREAMS, "bilinear")
    expected = TorchEngine(tiny_backbone).encode_streams(pixels, STREAMS, "bilinear")
    for start in STREAMS:
        assert ours[start].layers == expected[start].layers and ours[start].vv_attention_from == start
        for got, want in zip(ours[start].layer_tokens, expected[start].layer_tokens):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours[start].image_embeds, expected[start].image_embeds, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours[start].class_token, expected[start].class_token, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["baseline", "anomalyclip"])
def test_openvino_maps_and_scores_within_the_float32_bound(tiny_backbone, openvino_engine, method):
    model = tiny_model(method, tiny_backbone)
    image = (np.random.default_rng(5).random((90, 120, 3)) * 255).astype(np.uint8)
    on_torch = AnomalyDetector(tiny_backbone, {method: model}).detect(image, "metal nut")
    on_openvino = AnomalyDetector(tiny_backbone, {method: model}, engine=openvino_engine).detect(image, "metal nut")
    pearson = np.corrcoef(on_torch.anomaly_map.ravel(), on_openvino.anomaly_map.ravel())[0, 1]
    assert pearson >= FLOAT32_MAP_PEARSON
    assert abs(on_torch.score - on_openvino.score) <= FLOAT32_SCORE_DIFFERENCE


# Each int8 graph's bound on a float32 backbone (docs/PERFORMANCE.md, where the tiny CLIP's figures are measured):
# map Pearson and image-score difference against torch float32.
INT8_GRAPH_BOUNDS = {"openvino-int8": (0.9995, 5e-3), "openvino-w8a8": (0.998, 0.02)}


@pytest.mark.parametrize("route", INT8_GRAPH_BOUNDS)
@pytest.mark.parametrize("method", ["baseline", "stackclip", "anomalyclip"])
def test_int8_graphs_maps_and_scores_within_their_bound(tiny_backbone, engine_cache, route, method):
    model = tiny_model(method, tiny_backbone)
    image = (np.random.default_rng(6).random((90, 120, 3)) * 255).astype(np.uint8)
    on_torch = AnomalyDetector(tiny_backbone, {method: model}).detect(image, "metal nut")
    on_openvino = AnomalyDetector(tiny_backbone, {method: model}, engine=OpenVINOEngine(tiny_backbone, engine_cache, route)).detect(
        image, "metal nut")
    pearson = np.corrcoef(on_torch.anomaly_map.ravel(), on_openvino.anomaly_map.ravel())[0, 1]
    least_pearson, most_difference = INT8_GRAPH_BOUNDS[route]
    assert least_pearson <= pearson < 1 - 1e-7  # close, and not the float32 graph
    assert abs(on_torch.score - on_openvino.score) <= most_difference


def test_int8_graphs_are_their_own_graphs_with_int8_constants(tiny_backbone, tmp_path):
    pixels = random_pixels(1)
    files, engines = {}, {}
    for name in ("openvino", "openvino-int8", "openvino-w8a8"):
        engines[name] = OpenVINOEngine(tiny_backbone, tmp_path / name, name)
        engines[name].encode_streams(pixels, STREAMS, "bicubic")
        files[name] = graph_folders(tmp_path / name)[0]
    assert engines["openvino-int8"].describe() == "openvino float32, int8 weights"
    assert engines["openvino-w8a8"].describe() == "openvino float32, int8 weights and activations"
    assert len({folder.name for folder in files.values()}) == 3  # each its own fingerprint, so its own cache folder
    graphs = {name: (folder / "vision.xml").read_text() for name, folder in files.items()}
    assert 'element_type="u8"' in graphs["openvino-int8"] and 'element_type="u8"' not in graphs["openvino"]
    # int8 activations: every linear's input passes a FakeQuantize (the ranges calibrated at build time).
    fake_quantizes = graphs["openvino-w8a8"].count('type="FakeQuantize"')
    assert fake_quantizes >= tiny_backbone.vision_config.num_hidden_layers * 4 and 'type="FakeQuantize"' not in graphs["openvino-int8"]
    for name in ("openvino-int8", "openvino-w8a8"):
        assert (files[name] / "vision.bin").stat().st_size < 0.5 * (files["openvino"] / "vision.bin").stat().st_size


def test_int8_activations_run_an_int8_backbone_and_plain_openvino_refuses_it(tiny_clip_path, tmp_path):
    int8 = AnomalyDetector.load(methods=["baseline"], clip=str(tiny_clip_path), precision="int8", image_size=TEST_IMAGE_SIZE,
                                device="cpu", engine="torch").backbone
    with pytest.raises(ZSADError, match="openvino engine runs float32 or bfloat16 backbones, not int8"):
        OpenVINOEngine(int8, tmp_path, "openvino")
    w8a8 = OpenVINOEngine(int8, tmp_path, "openvino-w8a8")
    assert w8a8.describe() == "openvino float32, int8 weights and activations"
    pixels = calibration_pixels(int8, TEST_IMAGE_SIZE, 2, seed=1)  # photo-like, as auto checks it
    ours = w8a8.encode_streams(pixels, STREAMS, "bicubic")
    expected = TorchEngine(int8).encode_streams(pixels, STREAMS, "bicubic")
    assert features_pearson(ours, expected) >= FIDELITY_FLOOR


def test_calibration_images_are_the_same_everywhere_and_normalised(tiny_backbone):
    images = calibration_pixels(tiny_backbone, 56, 3)
    assert images.shape == (3, 3, 56, 56) and torch.equal(images, calibration_pixels(tiny_backbone, 56, 3))
    assert not torch.equal(images, calibration_pixels(tiny_backbone, 56, 3, seed=1))
    # In [0, 1] before normalisation, each image spanning the whole range.
    mean = torch.tensor(tiny_backbone.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_backbone.image_std).view(1, 3, 1, 1)
    raw = images * std + mean
    assert raw.amin() >= -1e-5 and raw.amax() <= 1 + 1e-5
    torch.testing.assert_close(raw.amax(dim=(1, 2, 3)), torch.ones(3))


def test_openvino_engine_checks_its_inputs_like_torch(openvino_engine):
    with pytest.raises(ZSADError, match="square"):
        openvino_engine.encode_streams(torch.zeros(1, 3, 112, 98), STREAMS, "bicubic")
    with pytest.raises(ZSADError, match="position_interpolation"):
        openvino_engine.encode_streams(random_pixels(1), STREAMS, "nearest")


def graph_folders(cache: Path) -> list[Path]:
    return [path for path in cache.iterdir() if path.is_dir() and not path.name.startswith(".")]


def test_one_graph_serves_a_narrower_pass_with_its_own_positions(tiny_backbone, tmp_path):
    engine = OpenVINOEngine(tiny_backbone, tmp_path)
    pixels = random_pixels(2)
    wide, narrow = {3: [2, 3, 4]}, {3: [4]}  # the shapes of the baseline's bicubic pass and AnomalyCLIP's bilinear one
    engine.encode_streams(pixels, wide, "bicubic")
    ours = engine.encode_streams(pixels, narrow, "bilinear")
    expected = TorchEngine(tiny_backbone).encode_streams(pixels, narrow, "bilinear")
    assert len(graph_folders(tmp_path)) == 1
    assert ours[3].layers == [4] and ours[3].position_interpolation == "bilinear"
    torch.testing.assert_close(ours[3].layer_tokens[0], expected[3].layer_tokens[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[3].class_token, expected[3].class_token, atol=1e-5, rtol=1e-4)
    bicubic = TorchEngine(tiny_backbone).encode_streams(pixels, narrow, "bicubic")
    assert not torch.allclose(ours[3].layer_tokens[0], bicubic[3].layer_tokens[0], atol=1e-3)  # the positions did change


def test_after_a_restart_a_narrower_pass_reads_the_wider_graph_on_disk(tiny_backbone, tmp_path):
    wide, narrow = {3: [2, 3, 4]}, {3: [4]}
    OpenVINOEngine(tiny_backbone, tmp_path).prepare(TEST_IMAGE_SIZE, wide, "bicubic")
    restarted = OpenVINOEngine(tiny_backbone, tmp_path)  # a new process, or the graph released: nothing compiled
    assert restarted.cached_covering_streams(TEST_IMAGE_SIZE, narrow) == wide
    assert restarted.cached_covering_streams(TEST_IMAGE_SIZE, {None: [4]}) is None  # another stream: not served
    assert OpenVINOEngine(tiny_backbone, tmp_path, "openvino-int8").cached_covering_streams(TEST_IMAGE_SIZE, narrow) is None
    pixels = random_pixels(1)
    ours = restarted.encode_streams(pixels, narrow, "bilinear")
    assert len(graph_folders(tmp_path)) == 1  # served by the wide graph, nothing built
    expected = TorchEngine(tiny_backbone).encode_streams(pixels, narrow, "bilinear")
    torch.testing.assert_close(ours[3].layer_tokens[0], expected[3].layer_tokens[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("graph, wanted, served", [
    ({6: [6, 12, 18, 24]}, {6: [24]}, True),
    ({6: [6, 12, 18, 24]}, {6: [12, 24]}, True),
    ({6: [24]}, {6: [6, 24]}, False),  # a layer it does not output
    ({None: [12, 24]}, {None: [12]}, False),  # it runs the last block whole, the pass needs only its class token
    ({None: [12], 6: [24]}, {6: [24]}, False),  # it runs another value-value stream
])
def test_a_graph_serves_a_pass_only_at_no_extra_compute(graph, wanted, served):
    assert covers(graph, wanted, num_layers=24) is served


def test_a_bfloat16_graph_keeps_float16_weights_and_torch_bfloat16_features(tiny_clip_path, tmp_path):
    from zsad import CLIPBackbone

    pixels = random_pixels(1)
    sizes = {}
    for dtype in (torch.float32, torch.bfloat16):
        backbone = CLIPBackbone.from_pretrained(str(tiny_clip_path), dtype=dtype)
        cache = tmp_path / str(dtype)
        ours = OpenVINOEngine(backbone, cache).encode_streams(pixels, STREAMS, "bicubic")
        sizes[dtype] = (graph_folders(cache)[0] / "vision.bin").stat().st_size
        expected = TorchEngine(backbone).encode_streams(pixels, STREAMS, "bicubic")
        pearson = np.corrcoef(ours[3].layer_tokens[-1].float().ravel(), expected[3].layer_tokens[-1].float().ravel())[0, 1]
        assert pearson >= 0.999
    assert sizes[torch.bfloat16] < 0.6 * sizes[torch.float32]


def test_explicit_engines_are_honoured(tiny_backbone, engine_cache):
    assert isinstance(vision_engine(tiny_backbone, "torch", engine_cache), TorchEngine)
    assert isinstance(vision_engine(tiny_backbone, "openvino", engine_cache), OpenVINOEngine)
    with pytest.raises(ZSADError, match="engine must be one of"):
        vision_engine(tiny_backbone, "tensorrt", engine_cache)


# ----- the cache folder, with a small hand-built OpenVINO graph ---------------------------------------------------


def doubling_graph(scale: float):
    """A real (1, 4) -> (1, 4) OpenVINO graph multiplying by ``scale``, small enough to build many times."""
    import openvino as ov
    import openvino.opset13 as ops

    inputs = ops.parameter([1, 4], np.float32)
    return ov.Model([ops.multiply(inputs, ops.constant(np.full((1, 4), scale, np.float32)))], [inputs])


def counting_build(builds: list, scale: float = 2.0):
    import openvino as ov

    def build(folder: Path) -> None:
        builds.append(folder)
        ov.save_model(doubling_graph(scale), str(folder / GRAPH_FILES[0]), compress_to_fp16=False)

    return build


def run_graph(compiled) -> np.ndarray:
    return compiled.create_infer_request().infer({0: np.ones((1, 4), np.float32)}).to_tuple()[0]


GRAPH_INPUTS = {"precision": "float32", "test": "doubling"}


def test_cache_is_built_once_then_read(tmp_path):
    builds = []
    first = cached_graph(tmp_path, GRAPH_INPUTS, counting_build(builds))
    again = cached_graph(tmp_path, GRAPH_INPUTS, counting_build(builds))
    assert len(builds) == 1 and run_graph(first).tolist() == run_graph(again).tolist() == [[2.0] * 4]
    folder = tmp_path / graph_fingerprint(GRAPH_INPUTS)
    assert sorted(path.name for path in folder.iterdir()) == sorted([*GRAPH_FILES, MANIFEST])
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temporary folder left


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def stale_fingerprint(path: Path) -> None:
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "fingerprint": "0" * 32}))


@pytest.mark.parametrize("damage", [
    lambda folder: flip_last_byte(folder / "vision.bin"),         # a weight changed: bad hash
    lambda folder: flip_last_byte(folder / "vision.xml"),
    lambda folder: (folder / "vision.bin").unlink(),              # a file missing
    lambda folder: (folder / MANIFEST).write_text("{not json"),   # manifest unreadable
    lambda folder: stale_fingerprint(folder / MANIFEST),          # manifest of another graph
], ids=["weights", "graph", "missing", "manifest", "stale"])
def test_damaged_or_stale_cache_is_rebuilt_never_used(tmp_path, damage):
    builds = []
    cached_graph(tmp_path, GRAPH_INPUTS, counting_build(builds, scale=2.0))
    folder = tmp_path / graph_fingerprint(GRAPH_INPUTS)
    damage(folder)
    # The rebuild writes a graph multiplying by 3: its output proves the damaged folder was not run.
    rebuilt = cached_graph(tmp_path, GRAPH_INPUTS, counting_build(builds, scale=3.0))
    assert len(builds) == 2 and run_graph(rebuilt).tolist() == [[3.0] * 4]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["fingerprint"] == graph_fingerprint(GRAPH_INPUTS) and set(manifest["files"]) == set(GRAPH_FILES)


def test_threads_building_at_once_leave_one_valid_cache(tmp_path):
    builds, results, barrier = [], [], threading.Barrier(6)

    def build_and_run():
        barrier.wait()
        results.append(run_graph(cached_graph(tmp_path, GRAPH_INPUTS, counting_build(builds))).tolist())

    threads = [threading.Thread(target=build_and_run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and results == [[[2.0] * 4]] * 6
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == [graph_fingerprint(GRAPH_INPUTS)]


PROCESS_BUILDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_engine import GRAPH_INPUTS, counting_build, run_graph
from zsad.runtime.engine import cached_graph
builds = []
slow = counting_build(builds)
def build(folder):
    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    slow(folder)
output = run_graph(cached_graph(Path(sys.argv[1]), GRAPH_INPUTS, build)).tolist()[0][0]
print(len(builds), output)
"""


@pytest.mark.integration
def test_two_processes_building_at_once_leave_one_valid_cache(tmp_path):
    tests_dir = str(Path(__file__).parent)
    processes = [subprocess.Popen([sys.executable, "-c", PROCESS_BUILDER, str(tmp_path), tests_dir], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = sorted(process.communicate(timeout=120)[0].split() for process in processes)
    assert all(process.returncode == 0 for process in processes)
    assert outputs == [["0", "2.0"], ["1", "2.0"]]  # one built, the other waited and read it
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == [graph_fingerprint(GRAPH_INPUTS)]


# ----- auto: the choice by measurement ----------------------------------------------------------------------------


def test_auto_measures_once_then_reads_its_record(tiny_backbone, engine_cache):
    pixels = random_pixels(1)
    measured = MeasuredEngine(tiny_backbone, engine_cache)
    measured.encode_streams(pixels, STREAMS, "bicubic")
    choice = measured.choice(TEST_IMAGE_SIZE, STREAMS, "bicubic")
    assert set(choice["seconds"]) == {"torch", "openvino"} and all(s > 0 for s in choice["seconds"].values())
    assert choice["engine"] == min(choice["seconds"], key=choice["seconds"].get)
    assert measured.describe().startswith(f"auto: {choice['engine']}")
    records = list((engine_cache / "choices").iterdir())
    assert len(records) == 1
    # A record naming the slower engine is what the next start runs: it reads, it does not measure again.
    slower = max(choice["seconds"], key=choice["seconds"].get)
    write_choice(records[0], {"engine": slower, "seconds": {**choice["seconds"], slower: 0.0}})
    assert MeasuredEngine(tiny_backbone, engine_cache).choice(TEST_IMAGE_SIZE, STREAMS, "bicubic")["engine"] == slower
    # A damaged record is measured again, and replaced.
    records[0].write_text("{}")
    remeasured = MeasuredEngine(tiny_backbone, engine_cache).choice(TEST_IMAGE_SIZE, STREAMS, "bicubic")
    assert remeasured["seconds"][slower] > 0
    assert json.loads(records[0].read_text())["engine"] == remeasured["engine"]


def test_detector_load_takes_the_engine_by_name(tiny_backbone):
    def loaded(engine):
        return AnomalyDetector.load(methods=["baseline"], clip=tiny_backbone, image_size=TEST_IMAGE_SIZE, engine=engine).engine

    assert isinstance(loaded("auto"), MeasuredEngine) and isinstance(loaded("torch"), TorchEngine)
    assert isinstance(loaded("openvino"), OpenVINOEngine) and loaded("openvino").int8 is None
    assert loaded("openvino-int8").int8 == "weights" and loaded("openvino-w8a8").int8 == "weights and activations"


def test_auto_considers_int8_graphs_only_when_the_precision_was_auto_or_int8(tiny_clip_path, tiny_backbone):
    from zsad.modeling.precision import cpu_has_native_bf16, cpu_may_have_int8_dot_products

    def candidates(clip, precision):
        detector = AnomalyDetector.load(methods=["baseline"], clip=clip, precision=precision, image_size=TEST_IMAGE_SIZE,
                                        device="cpu", engine="auto")
        return set(detector.engine.candidates)

    # auto is bfloat16 with native bf16, else torch's int8 linears (which only the w8a8 graph runs); the w8a8 graph only
    # where the CPU may have int8 dot products.
    w8a8 = {"openvino-w8a8"} if cpu_may_have_int8_dot_products() else set()
    automatic = {"torch", "openvino", "openvino-int8"} if cpu_has_native_bf16() else {"torch"}
    assert candidates(str(tiny_clip_path), "auto") == automatic | w8a8
    assert candidates(str(tiny_clip_path), "float32") == {"torch", "openvino"}
    assert candidates(str(tiny_clip_path), "int8") == {"torch"} | w8a8
    assert candidates(tiny_backbone, "auto") == {"torch", "openvino"}  # a ready backbone keeps its own precision


def test_auto_frees_the_graphs_it_did_not_choose_and_records_per_candidate_set(tiny_backbone, tmp_path, monkeypatch):
    from zsad.runtime import engine_choice

    monkeypatch.setattr(engine_choice, "cpu_may_have_int8_dot_products", lambda: True)
    measured = MeasuredEngine(tiny_backbone, tmp_path, quantised=True)
    choice = measured.choice(TEST_IMAGE_SIZE, STREAMS, "bicubic")
    assert set(choice["seconds"]) == {"torch", "openvino", "openvino-int8", "openvino-w8a8"}
    for name, engine in measured.candidates.items():
        if name != "torch":
            assert bool(engine._compiled) == (name == choice["engine"])
    # Without the int8 graphs the candidates differ: another record, not the one above (which may name one of them).
    assert set(MeasuredEngine(tiny_backbone, tmp_path).choice(TEST_IMAGE_SIZE, STREAMS, "bicubic")["seconds"]) == {"torch", "openvino"}
    assert len(list((tmp_path / "choices").iterdir())) == 2


class NoisyEngine(TorchEngine):
    """torch's vision pass plus noise as large as the features: fast, and wrong."""

    name = "noisy"

    def describe(self):
        return "noisy"

    def fingerprint(self, size, layers_by_start):
        return "noisy"

    def prepare(self, size, layers_by_start, position_interpolation):
        pass

    def encode_streams(self, pixel_values, layers_by_start, position_interpolation):
        features = super().encode_streams(pixel_values, layers_by_start, position_interpolation)
        for feature in features.values():
            feature.layer_tokens = [tokens + torch.randn_like(tokens) * tokens.std() for tokens in feature.layer_tokens]
        return features


def test_auto_leaves_out_a_route_whose_features_disagree_with_torch(tiny_backbone, tmp_path):
    measured = MeasuredEngine(tiny_backbone, tmp_path)
    measured.candidates["openvino"] = NoisyEngine(tiny_backbone)
    with pytest.warns(RuntimeWarning, match="openvino engine was left out: its features at Pearson"):
        choice = measured.choice(TEST_IMAGE_SIZE, STREAMS, "bicubic")
    assert choice["engine"] == "torch" and set(choice["seconds"]) == {"torch"}
    assert "openvino left out: its features at Pearson" in measured.describe()
    record = json.loads(next((tmp_path / "choices").iterdir()).read_text())
    assert "openvino" in record["left_out"]  # the next start reads why, and does not try it again


def test_openvino_is_no_candidate_off_the_cpu():
    from types import SimpleNamespace

    from zsad.runtime.engine import openvino_unsupported

    assert "on cuda" in openvino_unsupported(SimpleNamespace(device=torch.device("cuda")))


class CountingEngine(TorchEngine):
    """torch's vision pass, counting the calls that reach it: proves a surface runs its pass on the engine it is given."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.calls = 0

    def encode_streams(self, pixel_values, layers_by_start, position_interpolation):
        self.calls += 1
        return super().encode_streams(pixel_values, layers_by_start, position_interpolation)


def test_mutual_scoring_runs_its_vision_pass_on_the_detector_engine(tiny_backbone):
    from zsad.detection.mutual import detect_mutual

    images = [(np.random.default_rng(seed).random((40, 40, 3)) * 255).astype(np.uint8) for seed in range(3)]
    model = tiny_model("baseline", tiny_backbone)
    counting = CountingEngine(tiny_backbone)
    on_engine = detect_mutual(AnomalyDetector(tiny_backbone, {"baseline": model}, engine=counting), images, "plate")
    assert counting.calls >= 1
    on_torch = detect_mutual(AnomalyDetector(tiny_backbone, {"baseline": model}), images, "plate")
    assert [r.score for r in on_engine] == [r.score for r in on_torch]


@pytest.mark.parametrize("mutual", [False, True])
def test_evaluation_runs_its_vision_pass_on_the_named_engine(tiny_backbone, synthetic_root, tmp_path, monkeypatch, mutual):
    from zsad.evaluation.protocol import evaluate

    monkeypatch.setenv("ZSAD_ENGINE_CACHE", str(tmp_path / "engines"))
    root = synthetic_root(["tile"], 2)

    def scores(engine):
        _, records = evaluate(tiny_model("baseline", tiny_backbone), "mvtec", root, batch_size=4, mutual=mutual, engine=engine)
        return np.array([record.score for record in records])

    on_torch = scores("torch")
    assert not (tmp_path / "engines").exists()
    on_openvino = scores("openvino")
    assert any((tmp_path / "engines").glob("*/manifest.json"))  # the pass was built, then run, as an OpenVINO graph
    np.testing.assert_allclose(on_openvino, on_torch, atol=FLOAT32_SCORE_DIFFERENCE)


def test_few_shot_references_and_scores_run_on_the_detector_engine(tiny_backbone, synthetic_root):
    from accelerate import Accelerator

    from zsad.data import load_dataset
    from zsad.evaluation.few_shot import reference_memory
    from zsad.evaluation.protocol import score_samples

    samples = load_dataset("mvtec", synthetic_root(["tile"], 2), categories=["tile"])
    counting = CountingEngine(tiny_backbone)
    detector = AnomalyDetector(tiny_backbone, {"model": tiny_model("baseline", tiny_backbone)}, engine=counting)
    memory, scale = reference_memory(detector, samples[:2], "tile")
    assert counting.calls == 1 and memory.num_images == 2
    records = score_samples(detector, samples, 8, 0, Accelerator(), memory=memory, scale=scale)
    assert counting.calls == 2 and len(records) == len(samples)


def test_provenance_names_the_route_that_ran_the_vision_pass(tiny_backbone, engine_cache):
    model = tiny_model("baseline", tiny_backbone)

    def route(engine):
        return AnomalyDetector(tiny_backbone, {"baseline": model}, engine=engine).provenance("baseline", "plate", "plate", None)["vision_engine"]

    assert route(TorchEngine(tiny_backbone)) == "torch float32"
    assert route(OpenVINOEngine(tiny_backbone, engine_cache)) == "openvino float32"
    measured = MeasuredEngine(tiny_backbone, engine_cache)
    chosen = route(measured)  # auto decides the route when a result first needs to name it
    assert chosen == f"{measured.choice(TEST_IMAGE_SIZE, model.vision_streams(), model.config.position_interpolation)['engine']} float32"


def test_background_choice_serves_torch_until_the_measurement_is_done(tiny_backbone, tmp_path):
    from contextlib import contextmanager

    measuring_may_start = threading.Event()

    @contextmanager
    def turn():  # a server's turn on the model: held back here until the test lets the measurement run
        measuring_may_start.wait(timeout=60)
        yield

    measured = MeasuredEngine(tiny_backbone, tmp_path)
    measured.choose_in_background([(TEST_IMAGE_SIZE, STREAMS, "bicubic")], turn)
    pixels = random_pixels(1)
    meanwhile = measured.encode_streams(pixels, STREAMS, "bicubic")
    expected = TorchEngine(tiny_backbone).encode_streams(pixels, STREAMS, "bicubic")
    assert torch.equal(meanwhile[3].layer_tokens[0], expected[3].layer_tokens[0])
    assert measured.route(TEST_IMAGE_SIZE, STREAMS, "bicubic") == "torch float32"
    assert "measured in the background" in measured.describe()
    measuring_may_start.set()
    for _ in range(600):
        if measured.choices:
            break
        threading.Event().wait(0.1)
    choice = measured.choices[(TEST_IMAGE_SIZE, ((None, (1, 2)), (3, (3, 4))), "bicubic")]
    assert set(choice["seconds"]) == {"torch", "openvino"}
    assert measured.route(TEST_IMAGE_SIZE, STREAMS, "bicubic") == f"{choice['engine']} float32"
    assert len(list((tmp_path / "choices").iterdir())) == 1  # recorded: the next start reads it


def test_auto_leaves_openvino_out_when_its_graph_would_not_fit_in_memory(tiny_backbone, tmp_path, monkeypatch):
    from zsad.runtime import engine_choice

    weights = sum(p.numel() for p in tiny_backbone.model.vision_model.parameters()) * 4
    monkeypatch.setattr(engine_choice, "available_memory_bytes", lambda: int(weights))  # less than the compile's peak
    measured = MeasuredEngine(tiny_backbone, tmp_path)
    choice = measured.choice(TEST_IMAGE_SIZE, STREAMS, "bicubic")
    assert choice["engine"] == "torch" and "openvino left out" in choice["note"]
    assert "openvino left out" in measured.describe()
    assert not (tmp_path / "choices").exists() and not list(tmp_path.glob("*/manifest.json"))  # nothing built or recorded
    monkeypatch.setattr(engine_choice, "available_memory_bytes", lambda: int(10 * weights))
    assert set(MeasuredEngine(tiny_backbone, tmp_path).choice(TEST_IMAGE_SIZE, STREAMS, "bicubic")["seconds"]) == {"torch", "openvino"}
