"""Where models run and in which precision: the decision tables (CUDA and CPU queries patched: no GPU here) and
the plumbing from --device / ZSAD_DEVICE to every tensor of a loaded detector."""

import warnings

import pytest
import torch

from zsad import AnomalyDetector, ZSADError
from zsad.modeling import precision as precision_rule
from zsad.runtime import loading
from zsad.runtime.loading import resolve_device, resolve_precision
from zsad.space.config import build_parser as app_parser
from zsad.space.config import load_detector
from zsad.space.layout import build_demo
from zsad.space.render import runtime

from conftest import TEST_IMAGE_SIZE


def machine(monkeypatch, cuda: int = 0, cuda_bf16: bool = False, mps: bool = False, cpu_bf16: bool = False) -> None:
    """Pretend this machine has ``cuda`` GPUs (bfloat16 or not), MPS, and a CPU with or without native bfloat16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: cpu_bf16, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if cpu_bf16 else "AVX2")


@pytest.mark.parametrize(
    "hardware, device, expected",
    [
        (dict(cuda=1, cuda_bf16=True), "auto", "cuda"),  # CUDA first
        (dict(cuda=2, mps=True), "auto", "cuda"),
        (dict(mps=True), "auto", "mps"),  # then MPS
        (dict(), "auto", "cpu"),
        (dict(), None, "cpu"),
        (dict(cuda=2), "cuda:1", "cuda:1"),
        (dict(cuda=2), "cpu", "cpu"),
        (dict(mps=True), "mps", "mps"),
    ],
)
def test_device_decision_table(monkeypatch, hardware, device, expected):
    machine(monkeypatch, **hardware)
    assert resolve_device(device) == torch.device(expected)


@pytest.mark.parametrize(
    "hardware, device, message",
    [
        (dict(), "cuda", "0 CUDA GPU"),
        (dict(cuda=2), "cuda:2", "2 CUDA GPU"),
        (dict(), "mps", "MPS is not available"),
        (dict(), "tpu", "Unknown device"),
        (dict(), "gpu", "Unknown device"),
    ],
)
def test_devices_this_machine_lacks_are_refused_with_a_hint(monkeypatch, hardware, device, message):
    machine(monkeypatch, **hardware)
    with pytest.raises(ZSADError, match=message):
        resolve_device(device)


@pytest.mark.parametrize(
    "hardware, device, precision, expected",
    [
        (dict(cuda=1, cuda_bf16=True), "cuda", "auto", torch.bfloat16),  # A10G, L4, A100, H100
        (dict(cuda=1, cuda_bf16=False), "cuda", "auto", torch.float16),  # T4, V100
        (dict(mps=True), "mps", "auto", torch.float16),
        (dict(cpu_bf16=True), "cpu", "auto", torch.bfloat16),  # AVX512-BF16 / AMX
        (dict(cpu_bf16=False), "cpu", "auto", torch.qint8),  # AVX2-only: int8 vision linears
        (dict(cuda=1, cuda_bf16=True, cpu_bf16=False), "cpu", "auto", torch.qint8),  # the CPU decides for a CPU model
        (dict(cpu_bf16=False), "cpu", "int8", torch.qint8),
        (dict(cuda=1, cuda_bf16=False), "cuda", "float32", torch.float32),  # explicit names are kept
        (dict(cpu_bf16=True), "cpu", "float16", torch.float16),
    ],
)
def test_precision_decision_table(monkeypatch, hardware, device, precision, expected):
    machine(monkeypatch, **hardware)
    assert resolve_precision(precision, device) is expected


def test_int8_runs_on_the_cpu_only(monkeypatch):
    machine(monkeypatch, cuda=1, cuda_bf16=True)
    with pytest.raises(ZSADError, match="int8 .* CPU"):
        resolve_precision("int8", "cuda")


def test_unknown_precision_is_refused():
    with pytest.raises(ZSADError, match="precision"):
        resolve_precision("fp8")


def test_bfloat16_on_a_cpu_without_native_bfloat16_warns_once(monkeypatch):
    precision_rule._warn_slow_cpu_bf16.cache_clear()
    machine(monkeypatch, cpu_bf16=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bfloat16", "cpu") is torch.bfloat16
        resolve_precision("bfloat16", "cpu")
    assert len(caught) == 1 and "100x slower than float32" in str(caught[0].message) and "--precision float32" in str(caught[0].message)
    precision_rule._warn_slow_cpu_bf16.cache_clear()
    machine(monkeypatch, cpu_bf16=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_precision("bfloat16", "cpu")
        resolve_precision("bfloat16", "cuda")  # a GPU's bfloat16 is the GPU's business
    assert caught == []


def detector_tensors(detector: AnomalyDetector) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a detector holds: parameters and buffers of the backbone and of each model, and the cached
    text features of both caches."""
    tensors = [(f"backbone.{name}", tensor) for name, tensor in [*detector.backbone.named_parameters(), *detector.backbone.named_buffers()]]
    for method, model in detector.models.items():
        tensors += [(f"{method}.{name}", tensor) for name, tensor in [*model.named_parameters(), *model.named_buffers()]]
        tensors += [(f"{method} text cache {key}", value) for key, value in model._text_cache._entries.items()]
    tensors += [(f"frozen features {key}", value) for key, value in detector.backbone._frozen_features._entries.items()]
    return tensors


def test_every_tensor_of_a_loaded_detector_is_on_the_chosen_device(tiny_clip_path, monkeypatch):
    monkeypatch.setenv("ZSAD_DEVICE", "cpu")
    device = app_parser().parse_args([]).device
    detector = AnomalyDetector.load(clip=str(tiny_clip_path), image_size=TEST_IMAGE_SIZE, device=device)
    detector.compare(torch.rand(40, 50, 3).numpy(), "bottle")  # fills the text caches
    tensors = detector_tensors(detector)
    assert any("text cache" in name for name, _ in tensors) and any("frozen features" in name for name, _ in tensors)
    assert detector.device == torch.device("cpu")
    assert [name for name, tensor in tensors if tensor.device != torch.device("cpu")] == []


def test_a_detector_moves_its_backbone_to_the_resolved_device(tiny_clip_path, monkeypatch):
    """With CUDA patched in, loading asks for the GPU (the move itself is recorded, not done: no GPU here)."""
    machine(monkeypatch, cuda=1, cuda_bf16=False)
    moves = []
    monkeypatch.setattr(loading.CLIPBackbone, "to", lambda backbone, device: moves.append(device) or backbone)
    AnomalyDetector.for_model("baseline", clip=str(tiny_clip_path), image_size=TEST_IMAGE_SIZE)
    AnomalyDetector.for_model("baseline", clip=str(tiny_clip_path), image_size=TEST_IMAGE_SIZE, device="cpu")
    assert moves == [torch.device("cuda"), torch.device("cpu")]


def test_the_space_picks_device_and_precision_together(monkeypatch):
    machine(monkeypatch, cuda=1, cuda_bf16=False)  # a T4
    calls = []
    monkeypatch.setattr(AnomalyDetector, "load", classmethod(lambda cls, **options: calls.append(options)))
    load_detector(None, {}, precision="auto", device="auto")
    load_detector(None, {}, precision="auto", device="cpu")
    chosen = [(call["runtime"].device, call["runtime"].dtype) for call in calls]
    assert chosen == [(torch.device("cuda"), torch.float16), (torch.device("cpu"), torch.qint8)]


def test_device_option_reads_zsad_device(monkeypatch):
    from zsad_cli import build_parser

    monkeypatch.setenv("ZSAD_DEVICE", "cuda:1")
    arguments = ["predict", "x.png", "--model", "baseline", "--class-name", "bottle", "--out", "o"]
    assert build_parser().parse_args(arguments).device == "cuda:1" == app_parser().parse_args([]).device
    assert build_parser().parse_args([*arguments, "--device", "cpu"]).device == "cpu"


def test_the_space_shows_where_it_runs(tiny_backbone):
    detector = AnomalyDetector.load(methods=["baseline"], clip=tiny_backbone, image_size=TEST_IMAGE_SIZE, device="cpu")
    assert runtime(detector) == "Runs on CPU · vision tower in float32, text in float32 · vision pass: torch float32"
    assert runtime(detector) in build_demo(detector).config["components"].__repr__()
