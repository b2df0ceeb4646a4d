"""One loaded detector, model and pipeline called from 8 threads at once (as a threaded web server or a transformers
pipeline in a thread pool calls them): every result must equal the same call made alone. Nothing is stored on the
shared modules during a call, so concurrent calls cannot read each other's tokens."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import zsad
from zsad.inference import AnomalyDetector
from zsad.modeling.pipeline_zsad import ZeroShotAnomalyDetectionPipeline

from conftest import TEST_IMAGE_SIZE, tiny_model

THREADS, CALLS_PER_THREAD = 8, 20


def part(seed: int, size=(96, 80)) -> Image.Image:
    """A textured product picture, each seed its own (so a mixed-up token shows in the map)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    models = {
        "baseline": tiny_model("baseline", tiny_backbone),                          # value-value stream from block 1
        "baseline_stock": tiny_model("baseline", tiny_backbone, vv_attention_from=None),
        "stackclip": tiny_model("stackclip", tiny_backbone, vv_attention_from=2),
        "genclip": tiny_model("genclip", tiny_backbone, vv_attention_from=None),
        "genclip_small": tiny_model("genclip", tiny_backbone, image_size=84, vv_attention_from=3),
    }
    return AnomalyDetector(tiny_backbone, models)


@pytest.fixture(scope="module")
def profile(detector):
    return detector.build_profile("baseline", "wood", [part(100 + i) for i in range(3)])


def detection_arrays(result) -> list:
    return [np.float64(result.score), result.anomaly_map, result.verdict]


def jobs(detector, profile) -> dict:
    """name -> call, covering every route into the vision tower."""
    calls = {}
    for method in detector.method_names:
        calls[f"detect {method}"] = lambda method=method, seed=len(calls): detection_arrays(detector.detect(part(seed), "wood", method=method))
    calls["compare"] = lambda: [x for result in detector.compare(part(20), "bottle").values() for x in detection_arrays(result)]
    calls["references"] = lambda: detection_arrays(detector.detect(part(21), "wood", method="baseline", profile=profile))
    calls["tiles"] = lambda: detection_arrays(detector.detect_tiled(part(22, (200, 120)), "wood", method="stackclip", batch_size=2))
    calls["tiles with references"] = lambda: detection_arrays(
        detector.detect_tiled(part(23, (200, 120)), "wood", method="baseline", profile=profile))
    calls["mutual"] = lambda: [x for result in detector.detect_mutual([part(30 + i) for i in range(4)], "wood", method="baseline")
                               for x in detection_arrays(result)]
    calls["batch"] = lambda: [x for result in detector.detect_batch([part(40), part(41)], ["wood", "screw"], method="genclip")
                              for x in detection_arrays(result)]
    return calls


def same(got: list, expected: list) -> bool:
    return len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_every_route_gives_the_sequential_answer_under_threads(detector, profile):
    calls = jobs(detector, profile)
    expected = {name: call() for name, call in calls.items()}
    names = [list(calls)[i % len(calls)] for i in range(THREADS * CALLS_PER_THREAD)]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda name: (name, calls[name]()), names))
    wrong = sorted({name for name, got in results if not same(got, expected[name])})
    assert len(results) == THREADS * CALLS_PER_THREAD and not wrong, f"differs under threads: {wrong}"


def test_a_model_called_directly_from_threads(tiny_backbone):
    model = tiny_model("stackclip", tiny_backbone, vv_attention_from=2)
    pixels = [torch.randn(1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    names = ["wood", "screw", "bottle", "cable"]

    def call(i):
        with torch.inference_mode():
            output = model(pixels[i % 8], class_names=[names[i % 4]])
        return output.anomaly_map, output.image_score

    expected = [call(i) for i in range(8)]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(call, range(THREADS * CALLS_PER_THREAD)))
    assert all(torch.equal(got[0], expected[i % 8][0]) and torch.equal(got[1], expected[i % 8][1]) for i, got in enumerate(results))


def test_the_pipeline_in_a_thread_pool(tiny_backbone):
    pipe = ZeroShotAnomalyDetectionPipeline(model=zsad.load_model("baseline", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE),
                                            device="cpu")
    images = [part(60 + i) for i in range(6)]
    expected = [pipe(image, class_name="wood") for image in images]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda i: (i % 6, pipe(images[i % 6], class_name="wood")), range(THREADS * CALLS_PER_THREAD)))
    for index, got in results:
        assert got["score"] == expected[index]["score"]
        assert np.array_equal(got["anomaly_map"], expected[index]["anomaly_map"])
