"""The GPU tier (tiny CLIP): where models and features live on CUDA, half-precision forwards, and CPU vs CUDA parity
of the detector and of ``zsad predict --device cuda``. Skipped where no CUDA GPU is visible; benchmarks/gpu_check.sh
runs them with the GPU benchmark."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from zsad.cli import main
from zsad.errors import ZSADError
from zsad.inference import AnomalyDetector
from zsad.loading import resolve_device, resolve_precision

from conftest import TEST_IMAGE_SIZE
from image_files import random_rgb

pytestmark = pytest.mark.cuda

# Half precision against float32: at least this map Pearson, at most this score difference (the CPU's bf16 path keeps
# Pearson >= 0.99997 and differences <= 0.0043 on the tiny model).
MIN_PEARSON, MAX_SCORE_DIFFERENCE = 0.999, 0.01


@pytest.fixture
def exact_float32():
    """float32 really float32 on the GPU (cuDNN's TF32 convolutions off), so CPU and CUDA differ by summation order
    only; restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def detector_on(device: str, clip_path, precision: str = "float32") -> AnomalyDetector:
    return AnomalyDetector.load(clip=str(clip_path), precision=precision, image_size=TEST_IMAGE_SIZE, device=device)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def parts() -> list[Image.Image]:
    return [Image.fromarray(random_rgb(seed, width=90 + 10 * seed, height=70)) for seed in range(2)]


def test_auto_resolves_to_the_gpu_in_its_half_precision():
    assert resolve_device("auto") == torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert resolve_precision("auto", "cuda") == expected
    with pytest.raises(ZSADError, match="CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ZSADError, match="CPU only"):
        resolve_precision("int8", "cuda")


def test_backbone_and_every_model_live_on_the_gpu_and_results_come_back_as_numpy(tiny_clip_path):
    detector = detector_on("cuda", tiny_clip_path)
    assert detector.backbone.device.type == "cuda"
    for method, model in detector.models.items():
        assert {parameter.device.type for parameter in model.parameters()} == {"cuda"}, method
        assert {buffer.device.type for buffer in model.buffers()} <= {"cuda"}, method
    image = parts()[0]
    for method in detector.method_names:
        result = detector.detect(image, "bottle", method=method)
        assert isinstance(result.anomaly_map, np.ndarray) and result.anomaly_map.shape == (image.height, image.width)
        assert isinstance(result.score, float) and 0.0 <= result.score <= 1.0


def test_cpu_and_cuda_detectors_agree_in_float32(tiny_clip_path, exact_float32):
    cpu, cuda = detector_on("cpu", tiny_clip_path), detector_on("cuda", tiny_clip_path)
    images = parts()
    for method in cpu.method_names:
        expected = cpu.detect_batch(images, ["bottle", "metal nut"], method=method)
        got = cuda.detect_batch(images, ["bottle", "metal nut"], method=method)
        for on_cpu, on_cuda in zip(expected, got):
            assert on_cuda.score == pytest.approx(on_cpu.score, abs=1e-4), method
            np.testing.assert_allclose(on_cuda.anomaly_map, on_cpu.anomaly_map, rtol=0, atol=5e-4, err_msg=method)
            assert on_cuda.verdict == on_cpu.verdict or abs(on_cpu.score - on_cpu.threshold) < 1e-4


@pytest.mark.parametrize("precision", ["bfloat16", "float16"], ids=["bf16", "fp16"])
def test_half_precision_forward_on_cuda_stays_close_to_float32(tiny_clip_path, precision, exact_float32):
    dtype = getattr(torch, precision)
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bfloat16")
    half, exact = detector_on("cuda", tiny_clip_path, precision), detector_on("cuda", tiny_clip_path)
    assert half.backbone.dtype == dtype
    image = parts()[1]
    for method in half.method_names:
        got, expected = half.detect(image, "screw", method=method), exact.detect(image, "screw", method=method)
        assert np.isfinite(got.anomaly_map).all() and got.anomaly_map.dtype == np.float32, method
        assert abs(got.score - expected.score) <= MAX_SCORE_DIFFERENCE, method
        assert pearson(got.anomaly_map, expected.anomaly_map) >= MIN_PEARSON, method


def test_predict_command_on_cuda_writes_the_scores_the_cpu_writes(tiny_clip_path, tmp_path, exact_float32):
    image = tmp_path / "part.png"
    parts()[0].save(image)
    scores = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        arguments = ["predict", "--model", "genclip", "--clip", str(tiny_clip_path), "--class-name", "bottle",
                     "--image-size", str(TEST_IMAGE_SIZE), "--device", device, "--precision", "float32", str(image), "--out", str(out)]
        assert main(arguments) == 0
        scores[device] = json.loads((out / "scores.json").read_text())["images"][0]["score"]
    assert scores["cuda"] == pytest.approx(scores["cpu"], abs=1e-4)

