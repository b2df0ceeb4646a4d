"""The vision pass against an earlier commit's, on the same weights, runs interleaved: same numbers, same speed?

The earlier commit's ``zsad/modeling`` is taken with ``git archive`` (its modules import only their siblings) and
both backbones share one full-size CLIP ViT-L/14@336 (random weights) at 518 px with the lineage's tapped layers and
value-value stream. Prints the CPU class, the largest difference of their tapped tokens, and median seconds per pass
of each with their ratio. 1731561 is the last commit whose vision pass ran through forward hooks.

    python benchmarks/bench_vision_loop.py [--against 1731561] [--precision bfloat16|float32|int8] [--repeats 5]
"""

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_class_line, full_size_clip, machine_line, tiny_instead  # noqa: E402
from zsad.modeling.clip_backbone import CLIPBackbone  # noqa: E402
from zsad.modeling.clip_loading import fold_quick_gelu  # noqa: E402
from zsad.modeling.precision import quantize_vision_linears  # noqa: E402
from zsad.runtime.tiny_clip import save_tiny_clip  # noqa: E402


def earlier_backbone_class(commit: str, into: Path):
    """``CLIPBackbone`` of ``commit``'s ``zsad/modeling``, imported as the package ``earlier_modeling``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "zsad/modeling"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "zsad" / "modeling").rename(into / "earlier_modeling")
    sys.path.insert(0, str(into))
    return importlib.import_module("earlier_modeling.clip_backbone").CLIPBackbone


def clip_model():
    if tiny_instead():
        from transformers import CLIPModel
        return CLIPModel.from_pretrained(save_tiny_clip(tempfile.mkdtemp())).eval()
    return full_size_clip()


def main(against: str, precision: str, repeats: int) -> None:
    print(machine_line())
    print(cpu_class_line())
    clip = clip_model()
    fold_quick_gelu(clip.vision_model)
    current = CLIPBackbone(clip, tokenizer=None)
    if precision == "int8":
        quantize_vision_linears(current)  # in place: both backbones share the quantised blocks
    elif precision == "bfloat16":
        current.set_vision_dtype(torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        earlier = earlier_backbone_class(against, Path(folder))(clip, tokenizer=None)
        layers = [round(clip.config.vision_config.num_hidden_layers * q / 4) for q in (1, 2, 3, 4)]
        size = 112 if tiny_instead() else 518
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        passes = {"this tree": current, against: earlier}
        seconds: dict[str, list[float]] = {name: [] for name in passes}
        with torch.inference_mode():
            outputs = {name: backbone.encode_image(pixels, layers, vv_attention_from=layers[0]) for name, backbone in passes.items()}
            gap = max((a - b).abs().max().item() for a, b in zip(*(output.layer_tokens for output in outputs.values())))
            for repeat in range(repeats):
                for name in list(passes)[:: 1 if repeat % 2 else -1]:  # alternate who goes first
                    started = time.perf_counter()
                    passes[name].encode_image(pixels, layers, vv_attention_from=layers[0])
                    seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{precision}, {size} px, layers {layers}, value-value from block {layers[0]}: largest token difference {gap:.3g}")
    for name, median in medians.items():
        print(f"  {name:10s} median {median:.3f} s per pass ({', '.join(f'{value:.2f}' for value in seconds[name])})")
    print(f"  ratio this tree / {against}: {medians['this tree'] / medians[against]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="1731561", help="the commit to compare with (default: the hook-based pass)")
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.against, args.precision, args.repeats)
