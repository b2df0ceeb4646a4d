"""Every script in benchmarks/ runs to its end on the tiny random CLIP (``ZSAD_BENCH_TINY=1``) with minimal sizes, so
none can rot: a renamed module or changed signature fails here, not on the next real measurement. Their numbers
mean nothing at this size and are not checked; the exit status and the printed table are."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
HELPERS = {"common.py"}  # imported by the scripts, not run

# script: (arguments with minimal sizes; {work} is a fresh folder, {tiny} a tiny CLIP folder), text the output must hold
RUNS = {
    "bench_batch.py": (["--chunks", "1", "2", "--images", "2", "--workdir", "{work}"], "|"),
    "bench_camera.py": (["--repeats", "1", "--clip", "{tiny}", "--workdir", "{work}"], "|"),
    "bench_deploy.py": (["--repeats", "1", "--workdir", "{work}"], "onnxruntime int8"),
    "bench_false_alarm.py": (["--categories", "disk", "--shots", "4", "--rates", "0.2", "--draws", "1", "--held-out", "4",
                              "--defective", "2"], "|"),
    "bench_engine.py": (["--repeats", "1", "--workdir", "{work}"], "chosen: auto"),
    "bench_engine_fidelity.py": ([], "| openvino-w8a8 int8 |"),
    "bench_evaluate.py": (["--images-per-category", "2", "--workdir", "{work}"], "|"),
    "bench_inference.py": (["--repeats", "1", "--workdir", "{work}"], "|"),
    "bench_malloc.py": (["--workdir", "{work}"], "|"),
    "bench_memory.py": (["--workdir", "{work}", "--precisions", "float32"], "|"),
    "bench_metrics.py": (["--maps", "4", "--reference-maps", "2", "--dtype-maps", "2", "--repeats", "1"], "speed ratio"),
    "bench_mutual_lot.py": (["--sizes", "4", "--plain", "4", "--workdir", "{work}"], "|"),
    "bench_mutual.py": (["--sizes", "3", "--workdir", "{work}"], "|"),
    "bench_new_name.py": (["--workdir", "{work}", "--repeats", "1"], "cosine"),
    "bench_references.py": (["--repeats", "1", "--workdir", "{work}"], "|"),
    "bench_space_memory.py": (["--workdir", "{work}", "--images", "1"], "now / before"),
    "bench_startup.py": (["--repeats", "1"], "|"),
    "bench_training.py": (["--batch-size", "2", "--workdir", "{work}"], "|"),
    "bench_vision_loop.py": (["--repeats", "1", "--against", "HEAD"], "ratio this tree"),
    "heldout.py": (["--method", "stackclip", "--epochs", "1", "--work-dir", "{work}"], "AUROC"),
}
ELSEWHERE = {  # scripts that cannot run here, and where they are run
    "bench_cuda.py": "needs a CUDA GPU: benchmarks/gpu_check.sh runs it",
    "check_anomalyclip_vv.py": "needs the authors' AnomalyCLIP source file, which is not vendored",
    "check_anomalyclip.py": "needs a clone of the authors' AnomalyCLIP repository; its output is tests/fixtures/anomalyclip",
}


def test_every_benchmark_script_is_run_here_or_says_where():
    scripts = {path.name for path in BENCHMARKS.glob("*.py")} - HELPERS
    assert scripts == set(RUNS) | set(ELSEWHERE)


@pytest.mark.integration
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_on_the_tiny_clip(script, tmp_path, tiny_clip_path):
    arguments, expected = RUNS[script]
    arguments = [argument.format(work=tmp_path / "work", tiny=tiny_clip_path) for argument in arguments]
    environment = {**os.environ, "ZSAD_BENCH_TINY": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert expected in completed.stdout, completed.stdout[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_the_cuda_benchmark_runs_on_the_tiny_clip(tmp_path, tiny_clip_path):
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "bench_cuda.py"), "--repeats", "1", "--workdir", str(tmp_path),
                                "--clip", str(tiny_clip_path), "--image-size", "112"],
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
