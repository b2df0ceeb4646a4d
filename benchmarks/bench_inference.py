"""Inference speed and fidelity on the full-size CLIP ViT-L/14@336 architecture (random weights), 518 px, batch 1.

Prints, all measured in this run:
- the value-value attention's cost: end-to-end baseline detection with its default V-V stream against CLIP's own
  tokens (``--vv-only`` prints this alone);
- the plain matmul rate (fp32, bf16) and the floor: the backbone's vision forward in bf16 (transformers' CLIP
  vision tower with quick-GELU folded into one SiLU), its GFLOP/s, and the stock transformers forward;
- end-to-end latency per method (file decode -> score and map at the original size) in the Space's fast
  configuration, as a ratio to the floor; GenCLIP's per-image text pass as a share of the floor; the first
  request with a class name (its text features are computed then cached);
- the straightforward path (fp32, all hidden states kept, text recomputed every call) and the speed-up;
- fidelity of the fast path against fp32 (Pearson of maps, image-score difference), full size and tiny model.

The fast path runs in the precision ``--precision auto`` picks on this CPU (bf16 where it is native, int8 vision
linears on CPUs without native bf16, where bf16 is ~100x slower); the CPU class is printed first.

The allocator is set up as in the Space (``zsad.runtime.allocator``) unless ``--default-malloc`` is given. ``--methods``
picks the methods timed (default: every registered one), each at its own input size and position interpolation
(518 px; AnomalyCLIP bilinear, one tapped layer), with its time as a ratio to the baseline's when the baseline is
among them. ``--tiny`` runs everything on the tiny random CLIP instead (a check that the script runs, not a
measurement).

    python benchmarks/bench_inference.py [--repeats 3] [--workdir /tmp/zsad-bench] [--default-malloc]
    python benchmarks/bench_inference.py --methods baseline anomalyclip
    python benchmarks/bench_inference.py --vv-only [--vv-precision auto|float32|bfloat16|int8]
    python benchmarks/bench_inference.py --tiny --repeats 1 --methods baseline anomalyclip
"""

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    VIT_L14_336,
    cpu_class,
    cpu_class_line,
    full_size_inputs,
    machine_line,
    photo_like_image,
    timed,
)
from zsad import AnomalyDetector  # noqa: E402
from zsad.modeling.clip_backbone import CLIPBackbone, quarter_point_layers  # noqa: E402
from zsad.modeling.configuration_zsad_base import lineage_vv_attention_from  # noqa: E402
from zsad.runtime.allocator import return_large_buffers_to_the_system  # noqa: E402
from zsad.runtime.loading import INT8, load_model, resolve_precision  # noqa: E402
from zsad.runtime.methods import METHODS  # noqa: E402
from zsad.runtime.tiny_clip import save_tiny_clip  # noqa: E402

IMAGE_SIZE = 518
FAST = resolve_precision("auto", "cpu")  # what the Space runs here: bf16 where native, else int8 vision linears
FAST_NAME = "int8 vision linears" if FAST == INT8 else str(FAST).removeprefix("torch.")
STOCK_DTYPE = FAST if FAST.is_floating_point else torch.float32  # transformers builds no int8 CLIPModel
CLASS_NAME = "metal nut"
NEW_CLASS_NAME = "hazelnut"


def vision_forward(vision_model, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(seconds, GFLOP) of a CLIP vision tower's forward for one image in ``dtype``."""
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
        seconds = timed(lambda: vision_model(pixel_values=pixels, interpolate_pos_encoding=True), repeats=repeats)
    return seconds, counter.get_total_flops() / 1e9


def vision_floor(backbone, repeats: int) -> tuple[float, float]:
    """(seconds, GFLOP) of the backbone's own vision forward (transformers' tower, quick-GELU folded)."""
    return vision_forward(backbone.model.vision_model, backbone.dtype, repeats)


def stock_vision_seconds(clip_path: str, repeats: int) -> float:
    """Seconds of the vision forward of an unmodified transformers CLIPModel in the fast precision (float32 when
    that is int8), for comparison."""
    return vision_forward(CLIPModel.from_pretrained(clip_path, dtype=STOCK_DTYPE).vision_model, STOCK_DTYPE, repeats)[0]


@contextmanager
def straightforward_path(detector: AnomalyDetector):
    """The unoptimised path: every block's tokens kept (in float32), text never cached."""
    backbone = detector.backbone
    original_tower = backbone._run_vision_tower

    every_layer = list(range(1, backbone.vision_config.num_hidden_layers + 1))

    def all_hidden_states(pixel_values, layers_by_start, position_interpolation):
        streams = original_tower(pixel_values.float(), {start: every_layer for start in layers_by_start}, position_interpolation)
        return {start: streams[start].select(layers, start, position_interpolation) for start, layers in layers_by_start.items()}

    def uncached(key, compute):
        return compute()

    original_frozen_features = backbone.frozen_features
    originals = {name: model.cached_text for name, model in detector.models.items()}
    backbone._run_vision_tower, backbone.frozen_features = all_hidden_states, uncached
    for model in detector.models.values():
        model.cached_text = uncached
    try:
        yield detector
    finally:
        backbone._run_vision_tower, backbone.frozen_features = original_tower, original_frozen_features
        for name, model in detector.models.items():
            model.cached_text = originals[name]


def vv_flops() -> None:
    """GFLOP of the full-size vision pass at IMAGE_SIZE with and without the value-value stream from the lineage start,
    counted on meta tensors (no compute, so it does not depend on the machine)."""
    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(**VIT_L14_336)).eval()
    backbone = CLIPBackbone(clip, tokenizer=None)
    layers = quarter_point_layers(backbone.vision_config.num_hidden_layers)
    pixels = torch.empty(1, 3, IMAGE_SIZE, IMAGE_SIZE, device="meta")
    start = lineage_vv_attention_from(backbone.vision_config.num_hidden_layers)
    gflop = []
    for vv_attention_from in (None, start):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            backbone.encode_image(pixels, layers, vv_attention_from=vv_attention_from)
        gflop.append(counter.get_total_flops() / 1e9)
    stock, dense = gflop
    print(f"vision pass at {IMAGE_SIZE}px: {stock:.0f} GFLOP on CLIP's own tokens, {dense:.0f} GFLOP with the value-value stream "
          f"from block {start} ({dense / stock - 1:+.1%})")


def vv_cost(clip_path: str, image: str, repeats: int, precision: str = "auto") -> None:
    """End-to-end detection (file to map) of the baseline with its default value-value stream against the same model
    on CLIP's own tokens, on one backbone in ``precision`` (auto: the fast one), runs interleaved; wall and CPU
    seconds (medians)."""
    dtype = resolve_precision(precision, "cpu")
    detector = AnomalyDetector.load(methods=["baseline"], clip=clip_path, precision=precision, image_size=IMAGE_SIZE, device="cpu")
    start = detector.model("baseline").config.vv_attention_from
    stock = load_model("baseline", backbone=detector.backbone, image_size=IMAGE_SIZE, vv_attention_from=None)
    detectors = {f"value-value from block {start}": detector, "CLIP's own tokens": AnomalyDetector(detector.backbone, {"baseline": stock})}
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in detectors}
    for name, candidate in detectors.items():
        candidate.detect(image, CLASS_NAME)  # text features, first-call allocations
    for _ in range(repeats):
        for name, candidate in detectors.items():
            cpu, wall = time.process_time(), time.perf_counter()
            candidate.detect(image, CLASS_NAME)
            seconds[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    medians = {name: np.median(np.array(values), axis=0) for name, values in seconds.items()}
    base_wall, base_cpu = medians["CLIP's own tokens"]
    route = "int8 vision linears" if dtype == INT8 else str(dtype).removeprefix("torch.")
    print(f"\nvalue-value cost, baseline end to end, {route}, {IMAGE_SIZE}px, median of {repeats} interleaved runs")
    print("| tokens | wall s | CPU s | wall vs own tokens | CPU vs own tokens |\n|---|---|---|---|---|")
    for name, (wall, cpu) in medians.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / base_wall - 1:+.1%} | {cpu / base_cpu - 1:+.1%} |")


def text_seconds_per_call(detector: AnomalyDetector, method: str, image: str) -> float:
    """Wall time spent in the text encoder during one (warm) detection."""
    backbone = detector.backbone
    spent = []
    original = backbone.encode_text

    def timed_encode(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return result

    backbone.encode_text = timed_encode
    try:
        detector.detect(image, CLASS_NAME, method=method)
    finally:
        backbone.encode_text = original
    return sum(spent)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def fidelity(clip_path: str, image: str, image_size: int, methods: list[str]) -> dict[str, tuple[float, float]]:
    """Per method: (Pearson of the fast path's maps vs fp32 maps, |score difference|)."""
    fast = AnomalyDetector.load(methods=methods, clip=clip_path, precision="auto", image_size=image_size, device="cpu")
    exact = AnomalyDetector.load(methods=methods, clip=clip_path, precision="float32", image_size=image_size, device="cpu")
    results = {}
    for method in fast.method_names:
        a, b = fast.detect(image, CLASS_NAME, method=method), exact.detect(image, CLASS_NAME, method=method)
        results[method] = (pearson(a.anomaly_map, b.anomaly_map), abs(a.score - b.score))
    return results


def latency_tables(clip_path: str, image: str, repeats: int, methods: list[str]) -> None:
    """The floor, then per method the fast path, the straightforward path and the text share.

    The floor is timed before and after the methods and the faster of the two is used, so that a slow spell of
    the machine during one measurement cannot make the methods look closer to the floor than they are.
    """
    fast = AnomalyDetector.load(methods=methods, clip=clip_path, precision="auto", image_size=IMAGE_SIZE, device="cpu")
    floor_before, _ = vision_floor(fast.backbone, repeats)
    stock_seconds = stock_vision_seconds(clip_path, repeats)
    exact = AnomalyDetector.load(methods=methods, clip=clip_path, precision="float32", image_size=IMAGE_SIZE, device="cpu")
    fp32_floor, gflop = vision_floor(exact.backbone, repeats)  # FLOPs counted in float32: int8 linears are not counted

    rows = []
    for method in fast.method_names:
        first_seconds = timed(lambda: fast.detect(image, CLASS_NAME, method=method), repeats=1, warmup=0)  # fills the text cache
        fast_seconds = timed(lambda: fast.detect(image, CLASS_NAME, method=method), repeats=repeats, warmup=0)
        text = text_seconds_per_call(fast, method, image)
        with straightforward_path(exact):
            slow_seconds = timed(lambda: exact.detect(image, CLASS_NAME, method=method), repeats=1, warmup=0)
        rows.append((method, fast_seconds, slow_seconds, text, first_seconds))
    compare_seconds = timed(lambda: fast.compare(image, CLASS_NAME), repeats=1, warmup=0)
    compare_new_name_seconds = timed(lambda: fast.compare(image, NEW_CLASS_NAME), repeats=1, warmup=0)
    floor_after, _ = vision_floor(fast.backbone, repeats)
    floor = min(floor_before, floor_after)

    print(f"floor: transformers vision forward, {FAST_NAME}, {IMAGE_SIZE}px: {floor:.2f} s (before the methods {floor_before:.2f} s, "
          f"after {floor_after:.2f} s), {gflop:.0f} GFLOP -> {gflop / floor:.0f} GFLOP/s")
    stock_name = str(STOCK_DTYPE).removeprefix("torch.")
    print(f"stock transformers vision forward, {stock_name} (three-pass quick-GELU): {stock_seconds:.2f} s ({stock_seconds / floor:.2f}x the floor)")
    print(f"fp32 vision forward: {fp32_floor:.2f} s ({fp32_floor / floor:.2f}x the floor)")
    baseline_seconds = next((row[1] for row in rows if row[0] == "baseline"), None)
    print("\n| method | fast path (s) | / floor | / baseline | straightforward fp32 (s) | speed-up | text per image (s) "
          "| text / floor | first request with a new class name (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, fast_seconds, slow_seconds, text, first_seconds in rows:
        versus_baseline = f"{fast_seconds / baseline_seconds:.2f}" if baseline_seconds else "-"
        print(
            f"| {method} | {fast_seconds:.2f} | {fast_seconds / floor:.2f} | {versus_baseline} | {slow_seconds:.2f} | "
            f"{slow_seconds / fast_seconds:.1f}x | {text:.3f} | {text / floor:.1%} | {first_seconds:.2f} |"
        )
    print(f"\ncompare (all {len(fast.method_names)} methods, one vision pass per input size and interpolation): "
          f"{compare_seconds:.2f} s ({compare_seconds / floor:.2f}x the floor); "
          f"first request with a new class name {compare_new_name_seconds:.2f} s")


def tiny_inputs(workdir: Path) -> tuple[str, str]:
    """(the tiny random CLIP's folder, the photo-like test image) in ``workdir``: the script's own check."""
    workdir.mkdir(parents=True, exist_ok=True)
    return str(save_tiny_clip(workdir / "tiny-clip")), str(photo_like_image(workdir / "part.png"))


def main(workdir: str, repeats: int, space_malloc: bool, vv_only: bool, vv_precision: str, methods: list[str],
         tiny: bool = False) -> None:
    if space_malloc:
        return_large_buffers_to_the_system()
    clip_path, image = tiny_inputs(Path(workdir)) if tiny else full_size_inputs(Path(workdir))
    if tiny:
        print("tiny random CLIP (--tiny): a check that the script runs; the times below measure nothing useful")
    print(machine_line())
    print(cpu_class_line() if vv_only else cpu_class())
    print(f"fast path precision (--precision auto on this CPU): {FAST_NAME}")
    print(f"malloc: {'the Space settings (zsad.runtime.allocator)' if space_malloc else 'glibc defaults'}")
    vv_flops()
    vv_cost(clip_path, image, repeats, vv_precision)
    if vv_only:
        return

    latency_tables(clip_path, image, repeats, methods)

    print(f"\nfidelity of {FAST_NAME} against fp32 (Pearson of maps, |score difference|):")
    models = [("tiny", str(save_tiny_clip(tempfile.mkdtemp())), 224)]
    if not tiny:
        models.insert(0, ("full-size random", clip_path, IMAGE_SIZE))
    for label, path, size in models:
        for method, (correlation, score_gap) in fidelity(path, image, size, methods).items():
            print(f"  {label:16s} {method:10s} pearson {correlation:.5f}  score diff {score_gap:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument("--vv-only", action="store_true", help="only the value-value attention cost")
    parser.add_argument("--vv-precision", default="auto", help="the route the value-value cost is measured on (default auto)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS),
                        help="the methods timed end to end (default: all), e.g. --methods baseline anomalyclip")
    parser.add_argument("--tiny", action="store_true", help="the tiny random CLIP instead of the full-size one (checks the script)")
    args = parser.parse_args()
    main(args.workdir, args.repeats, space_malloc=not args.default_malloc, vv_only=args.vv_only, vv_precision=args.vv_precision,
         methods=args.methods, tiny=args.tiny)
