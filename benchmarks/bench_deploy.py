"""Deploy routes, end to end (image file -> score and map at the image's size), on the full-size random
CLIP ViT-L/14@336 at 518 px, in one run: the stock float32 PyTorch forward (the baseline of the ratios),
PyTorch int8 dynamic quantisation of the vision linears, ONNX Runtime fp32/int8, OpenVINO fp32/int8, and on
CPUs with native bf16 also PyTorch bf16 and OpenVINO bf16. Fidelity: Pearson of the maps and score difference
against PyTorch float32.

    python benchmarks/bench_deploy.py
    # an AVX2-only CPU, emulated on an AVX512/bf16 one (see the printed notes for what each engine honours):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_deploy.py

Exported graphs are kept in outputs/bench_deploy/ and reused by later runs.
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_class_line, emulated_isa, full_size_inputs, machine_line, timed  # noqa: E402
from zsad import AnomalyDetector  # noqa: E402
from zsad.deploy.export import convert_graph_folder, export  # noqa: E402
from zsad.deploy.runtime import CONFIG_NAME, ExportedDetector  # noqa: E402
from zsad.modeling.modeling_zsad_base import ZeroShotAnomalyOutput  # noqa: E402
from zsad.modeling.precision import cpu_has_native_bf16  # noqa: E402

WORKDIR = Path("outputs/bench_deploy")
CLASS_NAME = "metal nut"
FIDELITY = {"fp32": (0.9999, 1e-4), "bf16": (0.99, 0.01), "int8": (0.99, 0.01)}


def exported_variants(clip: str, method: str, workdir: Path) -> dict[str, Path]:
    """{"onnx-float32", "onnx-int8", "openvino-float32", "openvino-int8"}: folder; one torch export, the rest
    converted from its ONNX file (what ``zsad export`` does for each)."""
    folders = {f"{fmt}-{precision}": workdir / f"{method}-{fmt}-{precision}" for fmt in ("onnx", "openvino") for precision in ("float32", "int8")}
    base = folders["onnx-float32"]
    if not (base / CONFIG_NAME).exists():
        started = time.perf_counter()
        export(method, [CLASS_NAME], base, format="onnx", precision="float32", clip=clip)
        print(f"torch.onnx.export (dynamo) of {method}: {time.perf_counter() - started:.0f} s", flush=True)
    for key, folder in folders.items():
        if (folder / CONFIG_NAME).exists() or folder == base:
            continue
        fmt, precision = key.split("-")
        started = time.perf_counter()
        convert_graph_folder(base, folder, fmt, precision)
        print(f"{key}: written in {time.perf_counter() - started:.0f} s", flush=True)
    return folders


def torch_route(clip: str, method: str, precision: str):
    detector = AnomalyDetector.for_model(method, clip=clip, precision=precision)

    def run(image):
        result = detector.detect(image, CLASS_NAME)
        return result.score, result.anomaly_map

    return run


def graph_route(folder: Path, engine: str, **options):
    detector = ExportedDetector.load(folder, engine=engine, **options)

    def run(image):
        result = detector.detect(image, CLASS_NAME)
        return result.score, result.anomaly_map

    return run


def routes(clip: str, method: str, native_bf16: bool, workdir: Path) -> list[tuple[str, str, object]]:
    """(name, precision class for the fidelity bounds, factory) in the order they run; the first is the baseline."""
    graphs = exported_variants(clip, method, workdir)
    listed = [
        ("torch fp32 (stock)", "fp32", lambda: torch_route(clip, method, "float32")),
        ("torch int8 dynamic (vision linears, oneDNN; --precision int8)", "int8", lambda: torch_route(clip, method, "int8")),
        ("onnxruntime fp32", "fp32", lambda: graph_route(graphs["onnx-float32"], "onnx")),
        ("onnxruntime int8", "int8", lambda: graph_route(graphs["onnx-int8"], "onnx")),
        ("openvino fp32", "fp32", lambda: graph_route(graphs["openvino-float32"], "openvino")),
        ("openvino int8", "int8", lambda: graph_route(graphs["openvino-int8"], "openvino")),
    ]
    if native_bf16:
        listed += [
            ("torch bf16", "bf16", lambda: torch_route(clip, method, "bfloat16")),
            ("openvino bf16 (fp32 graph)", "bf16", lambda: graph_route(graphs["openvino-float32"], "openvino", inference_precision="bf16")),
            ("openvino int8 + bf16", "int8", lambda: graph_route(graphs["openvino-int8"], "openvino", inference_precision="bf16")),
        ]
    return listed


class GraphAsModel:
    """An exported graph where benchmarks.heldout expects a model: (B, 3, S, S) pixels and names -> output."""

    def __init__(self, model, detector: ExportedDetector):
        self.model, self.detector, self.config = model, detector, model.config

    def require_backbone(self):
        return self.model.require_backbone()

    def eval(self):
        return self

    def __call__(self, pixel_values: torch.Tensor, class_names: list[str]) -> ZeroShotAnomalyOutput:
        scores, maps = [], []
        for pixels, name in zip(pixel_values, class_names):
            image_scores, image_maps = self.detector.scores_and_maps(np.ascontiguousarray(pixels[None].numpy()))
            column = self.detector.class_names.index(name)
            scores.append(image_scores[0, column])
            maps.append(image_maps[0, column])
        return ZeroShotAnomalyOutput(anomaly_map=torch.from_numpy(np.stack(maps)), image_score=torch.tensor(np.array(scores)))


def int8_auroc(method: str, image_size: int = 112) -> None:
    """What int8 costs in AUROC on the synthetic held-out categories of benchmarks/heldout.py (tiny random CLIP,
    untrained model): PyTorch fp32 against the exported ONNX int8 graph and PyTorch --precision int8."""
    from benchmarks.heldout import FOLD_A, FOLD_B, evaluate
    from zsad.data.synthetic import generate
    from zsad.runtime.loading import load_model
    from zsad.testing import save_tiny_clip

    categories = FOLD_A + FOLD_B
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        clip = str(save_tiny_clip(work / "clip"))
        root = generate(work / "data", categories)
        model = load_model(method, clip=clip, image_size=image_size)
        export(model, categories, work / "int8", format="onnx", precision="int8")
        candidates = {
            "torch fp32": model,
            "onnxruntime int8 (exported)": GraphAsModel(model, ExportedDetector.load(work / "int8")),
            "torch --precision int8": load_model(method, clip=clip, image_size=image_size, precision="int8"),
        }
        print(f"\n{method}, untrained, tiny random CLIP at {image_size} px, synthetic held-out categories {categories}")
        print("| route | mean pixel AUROC | mean image AUROC |\n|---|---|---|")
        for name, candidate in candidates.items():
            metrics = evaluate(candidate, root, categories).values()
            pixel = np.mean([m["pixel_auroc"] for m in metrics])
            image = np.mean([m["image_auroc"] for m in metrics])
            print(f"| {name} | {pixel:.4f} | {image:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="baseline", choices=["baseline", "stackclip", "genclip"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only routes whose name contains one of these words (plus the baseline)")
    parser.add_argument("--auroc", action="store_true", help="instead: what int8 costs in AUROC on the synthetic held-out set")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help=f"where the exported graphs are kept and reused (default {WORKDIR})")
    args = parser.parse_args()
    if args.auroc:
        int8_auroc(args.method)
        return
    print(cpu_class_line())
    print(machine_line())
    emulated = bool(emulated_isa())
    native_bf16 = cpu_has_native_bf16() and not emulated
    if emulated:
        print("Emulation: torch (ATen, oneDNN incl. its int8 kernels, MKL) honours these settings. ONNX Runtime's MLAS "
              "kernels do not (they pick AVX512/VNNI from CPUID): its figures here are NOT AVX2 figures. OpenVINO runs "
              "with INFERENCE_PRECISION_HINT=f32 (no bf16); whether its kernels honour ONEDNN_MAX_CPU_ISA is not verified.")
    clip, image = full_size_inputs(args.workdir)
    baseline_seconds, reference = None, None
    listed = routes(clip, args.method, native_bf16, args.workdir)
    print("\n| route | s / image | x stock fp32 | map Pearson | score diff |\n|---|---|---|---|---|")
    for name, kind, factory in listed:
        if reference is not None and args.only and not any(word in name for word in args.only):
            continue
        try:
            run = factory()
            outputs = {}
            seconds = timed(lambda run=run: outputs.update(result=run(image)), repeats=args.repeats)
        except RuntimeError as error:  # e.g. OpenVINO's int8 kernels under ONEDNN_MAX_CPU_ISA=AVX2
            print(f"| {name} | failed: {str(error).splitlines()[-1][:160]} | | | |", flush=True)
            continue
        score, anomaly_map = outputs["result"]
        if reference is None:
            baseline_seconds, reference = seconds, (score, anomaly_map)
            reference_line = (f"reference (torch fp32): score {score:.6f}, map {anomaly_map.shape} in [{anomaly_map.min():.4f}, "
                              f"{anomaly_map.max():.4f}], std {anomaly_map.std():.4f}")
        pearson = float(np.corrcoef(reference[1].ravel(), anomaly_map.ravel())[0, 1])
        difference = abs(score - reference[0])
        bound_pearson, bound_score = FIDELITY[kind]
        holds = "" if pearson >= bound_pearson and difference <= bound_score else f" (outside {kind} bounds)"
        print(f"| {name} | {seconds:.2f} | {baseline_seconds / seconds:.2f}x | {pearson:.6f} | {difference:.2e}{holds} |", flush=True)
        del run
        gc.collect()
    print(f"\n{reference_line}")
    print(f"{args.method}, image 900x700 -> 518 px, median of {args.repeats} after 1 warm-up; " + cpu_class_line().split("; ")[-1])


if __name__ == "__main__":
    main()
