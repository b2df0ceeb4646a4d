"""Peak memory of the Space: ``python app.py`` serving every method on one shared full-size CLIP ViT-L/14@336
(random weights), in float32 and in the fast precision (bfloat16 vision), driven through its HTTP API.

For each precision a fresh server is started; the table gives its peak RSS until it serves (imports and
loading) and its peak RSS over one request per method plus one "compare all" request (the peak is reset in
between through /proc/PID/clear_refs), against the target 1.15 x the backbone's weight bytes + 400 MB.

    python benchmarks/bench_memory.py [--workdir /tmp/zsad-bench]
"""

import argparse
import math
import sys
import tempfile
from pathlib import Path

from gradio_client import Client, handle_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import full_size_inputs, proc_status_mb  # noqa: E402
from zsad.space.testing import serving_app  # noqa: E402

MB = 1024 * 1024
CLASS_NAME = "metal nut"


def backbone_weight_bytes(clip_path: str, precision: str) -> int:
    """Bytes of the backbone's weights as the Space holds them: vision tower in ``precision``, the rest float32."""
    import torch
    from safetensors import safe_open

    vision_bytes = torch.tensor([], dtype=getattr(torch, precision)).element_size()
    total = 0
    with safe_open(str(Path(clip_path) / "model.safetensors"), framework="pt") as weights:
        for name in weights.keys():
            count = math.prod(weights.get_slice(name).get_shape())
            total += count * (vision_bytes if name.startswith("vision_model.") else 4)
    return total


def measure_space(clip_path: str, image: str, precision: str) -> dict:
    with serving_app(REPO / "app.py", "--clip", clip_path, "--precision", precision, timeout=600) as (url, server):
        load_peak = proc_status_mb("VmHWM", server.pid)
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
        client = Client(url, verbose=False)
        for method in ("baseline", "stackclip", "genclip", "compare"):
            client.predict(handle_file(image), CLASS_NAME, method, 0.5, api_name="/detect")
        return {"load_peak": load_peak, "serving_peak": proc_status_mb("VmHWM", server.pid)}


def main(workdir: Path) -> None:
    clip_path, image = full_size_inputs(workdir)
    print("| precision | backbone weights (MB) | target (MB) | peak RSS until serving (MB) | / target | "
          "peak RSS while serving (MB) | / target |")
    print("|---|---|---|---|---|---|---|")
    for precision in ("float32", "bfloat16"):
        weights = backbone_weight_bytes(clip_path, precision) / MB
        target = 1.15 * weights + 400
        peaks = measure_space(clip_path, image, precision)
        print(
            f"| {precision} | {weights:.0f} | {target:.0f} | {peaks['load_peak']:.0f} | "
            f"{peaks['load_peak'] / target:.2f} | {peaks['serving_peak']:.0f} | {peaks['serving_peak'] / target:.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    main(Path(parser.parse_args().workdir))
