"""Shared pieces of the benchmarks: the full-size CLIP ViT-L/14@336 architecture with random weights
(compute does not depend on weight values, and the real weights cannot be downloaded here), timing.

``ZSAD_BENCH_TINY=1`` puts the tiny random CLIP (``zsad tiny-clip``) where the full-size one would be: the numbers
mean nothing then, but every route runs, which is how tests/test_benchmarks.py keeps the benchmarks from rotting.
"""

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

VIT_L14_336 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14),
    projection_dim=768,
)


def full_size_clip(dtype: torch.dtype = torch.float32) -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(**VIT_L14_336)).to(dtype).eval().requires_grad_(False)


def tiny_instead() -> bool:
    """Whether ``ZSAD_BENCH_TINY=1`` asks for the tiny random CLIP in place of the full-size one."""
    return os.environ.get("ZSAD_BENCH_TINY") == "1"


def save_full_size_clip(directory: str | Path) -> Path:
    """A loadable full-size CLIP folder (random weights, tiny tokenizer) for end-to-end benchmarks."""
    from zsad.runtime.tiny_clip import save_tiny_clip, tiny_tokenizer

    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return directory
    if tiny_instead():
        return save_tiny_clip(directory)
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(**VIT_L14_336)  # the real 49,408-token embedding table; the tiny tokenizer uses its first ids
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = config.text_config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def proc_status_mb(key: str, pid: int | str = "self") -> float:
    """A memory figure of a process from Linux's /proc/PID/status (e.g. VmRSS, VmHWM = peak RSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def photo_like_image(path: Path) -> Path:
    """A 900x700 photo-like PNG (not square, not 518 px) so decode and resizing are part of the timing."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((700, 900, 3)) * 60 + np.linspace(60, 180, 900)[None, :, None]).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def full_size_inputs(workdir: Path) -> tuple[str, str]:
    """(the full-size random CLIP's folder, the photo-like test image) in ``workdir``, made on first use."""
    workdir.mkdir(parents=True, exist_ok=True)
    clip_path = save_full_size_clip(workdir / "clip-vit-large-patch14-336-random")
    return str(clip_path), str(photo_like_image(workdir / "part.png"))


def run_times(fn, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timed(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` after ``warmup`` calls."""
    return statistics.median(run_times(fn, repeats, warmup))


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = timed(lambda: a @ b, repeats=repeats)
    return 2 * size**3 / seconds / 1e9


def machine_line() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
EMULATION_SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_flags() -> list[str]:
    """Which of ``CPU_FLAGS`` this CPU reports in /proc/cpuinfo (what the hardware has, whatever is emulated)."""
    from zsad.modeling.precision import cpu_flag_words

    words = cpu_flag_words() or set()
    return [flag for flag in CPU_FLAGS if flag in words]


def emulated_isa() -> dict[str, str]:
    """The settings that make torch / oneDNN / MKL use fewer instructions than the CPU has, where set."""
    return {name: os.environ[name] for name in EMULATION_SETTINGS if name in os.environ}


def cpu_class_line() -> str:
    """One line: model name, flags, whether bf16 is native, and the kernels torch actually dispatches to."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    from zsad.modeling.precision import cpu_has_native_bf16

    emulated = emulated_isa()
    return (f"CPU: {model}; flags {' '.join(cpu_flags())}; native bf16: {'yes' if cpu_has_native_bf16() else 'no'}; "
            f"torch kernels: {torch.backends.cpu.get_cpu_capability()}"
            + (f"; EMULATED with fewer instructions than the CPU has, via {emulated}" if emulated else "")
            + f"; load average {os.getloadavg()[0]:.1f}")


def cpu_class() -> str:
    """``cpu_class_line`` plus the measured fp32 and bf16 matmul rates (bf16 on a smaller product where it is not
    native: ~100x slower there)."""
    from zsad.modeling.precision import cpu_has_native_bf16

    bf16_size = 2048 if cpu_has_native_bf16() else 512
    return (f"{cpu_class_line()}; matmul fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s (2048^3), "
            f"bf16 {matmul_gflops(torch.bfloat16, bf16_size, repeats=3):.1f} GFLOP/s ({bf16_size}^3)")
