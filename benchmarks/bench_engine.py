"""Which vision engine is fastest on this CPU, and how zsad's ``auto`` compares with the stock transformers forward.

Full-size CLIP ViT-L/14@336 (random weights), 518 px, batch 1, a 900x700 PNG. Prints, all measured in this run:

- the stock transformers vision forward (``CLIPModel.vision_model``, ``interpolate_pos_encoding``) in float32 and,
  where the CPU has native bf16, in bfloat16; the yardstick (bfloat16 where native, else float32) is timed again
  interleaved with each route and with the ``auto`` surfaces (one stock forward, then one call of each, per repeat),
  so that every ratio compares medians taken under the same conditions (a shared machine drifts by 10% or more
  between minutes);
- each candidate route (engine x precision this CPU runs natively), end to end for the baseline (file decode -> score
  and map at the original size): median seconds, ratio to the stock forward, fidelity against torch float32 (Pearson
  of the maps, |image-score difference|), and the first call's time (which builds the OpenVINO graph);
- zsad end to end with ``--precision auto --engine auto`` (on the engine cache the route rows filled, so the first
  call compiles their graphs and makes the measurement ``auto`` makes; a route row's first call shows its build) for
  the baseline, StackCLIP, GenCLIP and ``compare``, and what it chose; ``torch`` with ``--precision auto`` is the
  route ``auto`` ran before the engines existed;
- the work per image (``FlopCounterMode``) of the stock forward and of zsad's vision pass for the baseline (its
  value-value stream adds work), and the rate each is done at, to set against the CPU's matmul rate on the first line.

    python benchmarks/bench_engine.py [--repeats 5] [--workdir /tmp/zsad-bench] [--engine-cache DIR] [--default-malloc]

``--engine-cache`` keeps the graphs in DIR (reused by the next run, whose first calls then read rather than build them);
by default each run builds them in a fresh folder, removed at the end.

glibc's malloc is set up as in the Space (``zsad.runtime.allocator``) unless ``--default-malloc`` is given.

``ZSAD_BENCH_TINY=1`` runs it on the tiny random CLIP (a check that it runs; the numbers mean nothing). The other
CPU classes are emulated on a CPU with AMX (the CPU class line says so; OpenVINO's oneDNN kernels honour
``ONEDNN_MAX_CPU_ISA`` as torch's do, though the plug-in picks some kernels by reading the CPU itself, see
docs/PERFORMANCE.md): AVX512 without BF16 with ``ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI``,
AVX2 with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``.
"""

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cpu_class, full_size_inputs, machine_line, proc_status_mb, timed, tiny_instead  # noqa: E402
from zsad import AnomalyDetector  # noqa: E402
from zsad.modeling.precision import cpu_has_native_bf16  # noqa: E402
from zsad.runtime.allocator import return_large_buffers_to_the_system  # noqa: E402

IMAGE_SIZE = 518
CLASS_NAME = "metal nut"
AUTO_METHODS = ("baseline", "stackclip", "genclip")


def routes() -> list[tuple[str, str]]:
    """(engine, precision) pairs to time: torch in each precision this CPU runs natively (bfloat16 only with native
    bf16: elsewhere it is 3-100x slower), OpenVINO in float32, and each OpenVINO route ``auto`` measures in the
    precision ``--precision auto`` chooses (bfloat16 where native, else int8, which only ``openvino-w8a8`` runs)."""
    native_bf16 = cpu_has_native_bf16()
    rows = [("torch", "float32"), ("torch", "int8")] + ([("torch", "bfloat16")] if native_bf16 else [])
    if importlib.util.find_spec("openvino"):
        rows.append(("openvino", "float32"))
        if native_bf16:
            rows.append(("openvino", "bfloat16"))
        if importlib.util.find_spec("nncf"):
            rows += [("openvino-int8", "bfloat16"), ("openvino-w8a8", "bfloat16")] if native_bf16 else [("openvino-w8a8", "int8")]
    return rows


def stock_vision(clip_path: str, dtype: torch.dtype):
    """The unmodified transformers CLIP vision forward for one image at IMAGE_SIZE in ``dtype``, as a call."""
    vision = CLIPModel.from_pretrained(clip_path, dtype=dtype).vision_model.eval()
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)

    def forward():
        with torch.inference_mode():
            vision(pixel_values=pixels, interpolate_pos_encoding=True)

    return forward


def stock_forwards(clip_path: str, repeats: int) -> dict[str, float]:
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    return {str(dtype).removeprefix("torch."): timed(stock_vision(clip_path, dtype), repeats=repeats) for dtype in dtypes}


def interleaved(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call, timed in turn within each of ``repeats`` rounds (after a warm-up round)."""
    times = {name: [] for name in calls}
    for round_number in range(repeats + 1):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if round_number:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def counted_flops(call) -> float:
    """Floating-point operations of ``call()`` as torch's ``FlopCounterMode`` counts them (matrix products and
    attention), with the CPU attention kernel counted too (torch's table names only the GPU ones)."""
    from torch.utils import flop_counter

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.inference_mode():
        call()
    return float(counter.get_total_flops())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def load(clip_path: str, precision: str, engine: str, methods=None) -> AnomalyDetector:
    return AnomalyDetector.load(clip=clip_path, precision=precision, image_size=IMAGE_SIZE, device="cpu", engine=engine,
                                methods=methods)


def first_call(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def route_row(clip_path: str, image: str, engine: str, precision: str, repeats: int, reference, stock) -> dict:
    detector = load(clip_path, precision, engine, methods=["baseline"])
    call = partial(detector.detect, image, CLASS_NAME, method="baseline")
    first = first_call(call)
    seconds = interleaved({"stock": stock, "route": call}, repeats)
    result = call()
    return {"route": f"{engine} {precision}", "first": first, "seconds": seconds["route"], "stock": seconds["stock"],
            "pearson": pearson(result.anomaly_map, reference.anomaly_map), "score_diff": abs(result.score - reference.score)}


def route_rows(clip_path: str, image: str, repeats: int, reference, stock) -> list[dict]:
    rows = []
    for engine, precision in routes():
        rows.append(route_row(clip_path, image, engine, precision, repeats, reference, stock))
        gc.collect()  # the route's detector, before the next one loads
    return rows


def auto_rows(clip_path: str, image: str, repeats: int, references: dict, stock) -> tuple[list[dict], str, float]:
    """The rows, what auto chose, and how much the process's resident memory grew while auto built, compiled and ran
    its graphs (MB, after the detector was loaded)."""
    detector = load(clip_path, "auto", "auto")
    loaded_mb = proc_status_mb("VmRSS")
    calls = {method: partial(detector.detect, image, CLASS_NAME, method=method) for method in AUTO_METHODS}
    calls[f"compare ({len(detector.method_names)} methods)"] = partial(detector.compare, image, CLASS_NAME)
    firsts = {name: first_call(call) for name, call in calls.items()}
    seconds = interleaved({"stock": stock, **calls}, repeats)
    rows = []
    for name in calls:
        row = {"route": name, "first": firsts[name], "seconds": seconds[name], "stock": seconds["stock"]}
        if name in references:
            result = calls[name]()
            row.update(pearson=pearson(result.anomaly_map, references[name].anomaly_map), score_diff=abs(result.score - references[name].score))
        rows.append(row)
    return rows, detector.engine.describe(), proc_status_mb("VmRSS") - loaded_mb


def print_table(title: str, rows: list[dict], yardstick_name: str) -> None:
    print(f"\n{title}\n| route | median s | stock {yardstick_name} forward, interleaved: median s | ratio | first call s "
          "| Pearson vs torch float32 | score diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        fidelity = (f"{row['pearson']:.5f} | {row['score_diff']:.4f}" if "pearson" in row else "- | -")
        print(f"| {row['route']} | {row['seconds']:.2f} | {row['stock']:.2f} | {row['seconds'] / row['stock']:.2f} | {row['first']:.1f} "
              f"| {fidelity} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    parser.add_argument("--engine-cache", help="keep the graphs in this folder, and read those already there")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc settings")
    args = parser.parse_args()
    if not args.default_malloc:
        return_large_buffers_to_the_system()
    clip_path, image = full_size_inputs(Path(args.workdir))
    print(machine_line())
    print(cpu_class())
    print(f"malloc: {'glibc defaults' if args.default_malloc else 'the Space settings (zsad.runtime.allocator)'}")
    if tiny_instead():
        print("tiny random CLIP (ZSAD_BENCH_TINY=1): a check that the script runs; the numbers mean nothing")
    with tempfile.TemporaryDirectory() as fresh:
        cache = args.engine_cache or fresh  # a fresh engine cache: each route's first call includes its graph's build
        os.environ["ZSAD_ENGINE_CACHE"] = cache
        stock = stock_forwards(clip_path, args.repeats)
        yardstick_name = "bfloat16" if "bfloat16" in stock else "float32"
        yardstick = stock_vision(clip_path, getattr(torch, yardstick_name))
        exact = load(clip_path, "float32", "torch", methods=list(AUTO_METHODS))
        references = {method: exact.detect(image, CLASS_NAME, method=method) for method in AUTO_METHODS}
        baseline, backbone = exact.model("baseline"), exact.backbone
        pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        work = {"stock": counted_flops(stock_vision(clip_path, torch.float32)),
                "zsad": counted_flops(partial(backbone.encode_image_streams, pixels, baseline.vision_streams(),
                                              baseline.config.position_interpolation))}
        del exact, baseline, backbone
        candidates = route_rows(clip_path, image, args.repeats, references["baseline"], yardstick)
        automatic, chosen, auto_growth_mb = auto_rows(clip_path, image, args.repeats, references, yardstick)
        cache_mb = sum(path.stat().st_size for path in Path(cache).rglob("*") if path.is_file()) / 2**20
        graphs = len(list(Path(cache).glob("*/manifest.json")))
    print("\nstock transformers vision forward, " + f"{IMAGE_SIZE} px, median of {args.repeats} at the start: "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stock.items()))
    print_table(f"candidate routes, baseline end to end (median of {args.repeats}):", candidates, yardstick_name)
    print_table(f"--precision auto --engine auto, end to end (median of {args.repeats}); chosen: {chosen}", automatic, yardstick_name)
    print(f"\ngraphs in the engine cache (the routes' and auto's): {graphs}, {cache_mb:.0f} MB on disk; resident memory grew by "
          f"{auto_growth_mb:.0f} MB while auto built, compiled and ran its graphs (after the detector was loaded)")
    stock_seconds, zsad_seconds = automatic[0]["stock"], automatic[0]["seconds"]
    print(f"\nwork per image: the stock forward {work['stock'] / 1e9:.0f} GFLOP, the baseline's vision pass {work['zsad'] / 1e9:.0f} "
          f"GFLOP ({work['zsad'] / work['stock']:.2f}x: its value-value stream, less the last block's patch tokens); "
          f"done at {work['stock'] / stock_seconds / 1e9:.0f} GFLOP/s by the stock {yardstick_name} forward and "
          f"{work['zsad'] / zsad_seconds / 1e9:.0f} GFLOP/s by auto's baseline end to end")
    previous = next((row for row in candidates if row["route"] == f"torch {previous_auto()}"), None)
    if previous:
        ratio = (automatic[0]["seconds"] / automatic[0]["stock"]) / (previous["seconds"] / previous["stock"])
        print(f"\nauto baseline / the route auto ran before the engines (torch {previous_auto()}), each against its interleaved "
              f"stock forward: {ratio:.2f}")


def previous_auto() -> str:
    return "bfloat16" if cpu_has_native_bf16() else "int8"


if __name__ == "__main__":
    main()
