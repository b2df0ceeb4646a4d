"""Loading a checkpoint the way Hub users do: ``AutoModel.from_pretrained(..., trust_remote_code=True)`` in a
fresh process where ``zsad`` cannot be imported, so only the code files saved with the checkpoint run."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# The first lines of a script that must run where zsad cannot be imported (as on a machine without it).
WITHOUT_ZSAD = textwrap.dedent(
    """
    import sys
    sys.modules["zsad"] = None  # importing zsad must fail in this process
    try:
        import zsad  # noqa: F401
        raise SystemExit("zsad was importable")
    except ImportError:
        pass
    """
)

SCRIPT = WITHOUT_ZSAD + textwrap.dedent(
    """
    import dataclasses
    import torch
    from transformers import AutoModel
    case = torch.load(sys.argv[2])
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert not model.clip.training and not any(p.requires_grad for p in model.clip.parameters())
    with torch.no_grad():
        output = model(case["pixels"], class_names=case["class_names"])
    torch.testing.assert_close(output.anomaly_map, case["map"], rtol=0, atol=1e-6)
    torch.testing.assert_close(output.image_score, case["score"], rtol=0, atol=1e-6)
    details = output.image_details(0)  # image 0's parts, as plain values (the remote classes do not unpickle here)
    torch.save({"class": type(model).__name__, "details": dataclasses.asdict(details) if details else None}, sys.argv[3])
    """
)


def run_without_zsad(checkpoint: Path, pixels: torch.Tensor, class_names, expected, workdir: Path) -> dict:
    """Assert the remote-code model reproduces ``expected`` (map and score, 1e-6); return its class name and details."""
    case, result = workdir / "remote_case.pt", workdir / "remote_result.pt"
    torch.save({"pixels": pixels, "class_names": class_names, "map": expected.anomaly_map, "score": expected.image_score}, case)
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(checkpoint), str(case), str(result)],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(result, weights_only=False)
