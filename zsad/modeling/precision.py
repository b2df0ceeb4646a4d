"""One precision rule for every surface, the checkpoint's own pipeline included (this file travels with every
checkpoint as remote code, so it imports nothing outside ``zsad.modeling``): what "auto" and each precision name
mean on a device, and how a CLIP backbone is loaded and converted to serve in it."""

import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch

from .clip_backbone import CLIPBackbone
from .exceptions import ZSADError

# "int8": a float32 backbone whose vision linear layers run with int8 weights and per-call int8 activations.
INT8 = torch.qint8
# The precision names of zsad (the CLI, the Space, the pipeline, exports) and the vision tower's dtype for each.
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", INT8: "int8"}
SLOW_CPU_BF16 = (
    "bfloat16 was asked for on a CPU without native bfloat16 (no AVX512-BF16/AMX): torch falls back to reference "
    "kernels there, about 100x slower than float32. Use --precision float32, or auto (int8 vision linears here)."
)


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) below its bfloat16 kernels: under them its bf16 matrix products
# are emulated, about 3x slower than float32 (an AVX512 CPU without BF16) or far slower (AVX2).
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products in hardware (AVX512-BF16 or AMX) and torch uses them: its
    AVX512 kernels (``ATEN_CPU_CAPABILITY=avx2`` turns them off) and oneDNN's bf16 ones (``ONEDNN_MAX_CPU_ISA`` set
    below ``AVX512_CORE_BF16`` turns them off)."""
    # torch exposes the CPU feature checks only under private names; absent ones mean "not supported".
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    has_instructions = any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    onednn_capped = onednn_isa_cap() in ONEDNN_ISAS_WITHOUT_BF16
    return has_instructions and not onednn_capped and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_isa_cap() -> str:
    """oneDNN's instruction-set cap (``ONEDNN_MAX_CPU_ISA``, upper-cased; "" when unset)."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()


def cpu_flag_words() -> set[str] | None:
    """The words of Linux's /proc/cpuinfo, its feature flags among them (None where there is no such file)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


# The int8 dot-product instructions (VNNI, AMX-INT8) as Linux's /proc/cpuinfo names them, and oneDNN's caps below them.
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
ONEDNN_ISAS_WITHOUT_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})


def cpu_may_have_int8_dot_products() -> bool:
    """False where this CPU surely has no int8 dot-product instructions oneDNN may use: /proc/cpuinfo lists none of
    ``INT8_DOT_PRODUCT_FLAGS``, or ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below them. True elsewhere, a system without
    /proc/cpuinfo included (there a measurement decides)."""
    if onednn_isa_cap() in ONEDNN_ISAS_WITHOUT_VNNI:
        return False
    words = cpu_flag_words()
    return words is None or bool(words & INT8_DOT_PRODUCT_FLAGS)


def resolve_precision(precision: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The vision backbone's dtype for a precision name on ``device`` (the text side stays float32 whatever this
    says: ``CLIPBackbone.set_vision_dtype``). "auto" picks, by where the model runs:

    | device | auto |
    |---|---|
    | CUDA GPU with bfloat16 (Ampere and newer) | bfloat16 |
    | CUDA GPU without it (T4, V100) | float16 |
    | MPS | float16 |
    | CPU with AVX512-BF16/AMX | bfloat16 |
    | other CPUs | int8 vision linears (``INT8``): 2.1x float32 on AVX2 kernels, maps within Pearson 0.99998 on random
    weights (benchmarks/bench_deploy.py); bfloat16 is ~100x slower there, and asking for it warns |
    """
    names = ("auto", *DTYPE_NAMES.values())
    if precision not in names:
        raise ZSADError(f"precision must be one of {names}, got '{precision}'.")
    device = torch.device(device)
    if precision == "int8":
        if device.type != "cpu":
            raise ZSADError(f"int8 (dynamic int8 linears) runs on the CPU only; on {device.type} use auto, bfloat16 or float16.")
        return INT8
    if precision != "auto":
        if precision == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
            _warn_slow_cpu_bf16()
        return getattr(torch, precision)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else INT8


@functools.cache
def _warn_slow_cpu_bf16() -> None:
    warnings.warn(SLOW_CPU_BF16, RuntimeWarning, stacklevel=3)


def weights_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a backbone's vision weights are read in for ``dtype`` (int8 linears are made from float32 ones)."""
    return torch.float32 if dtype == INT8 else dtype


def load_backbone_in(name: str, revision: str | None, dtype: torch.dtype | None) -> CLIPBackbone:
    """A CLIP read with its vision tower in ``dtype`` (``INT8``: float32 weights, then int8 vision linears)."""
    return in_precision(CLIPBackbone.from_pretrained(name, revision=revision, dtype=weights_dtype(dtype)), dtype)


def in_precision(backbone: CLIPBackbone, dtype: torch.dtype | None) -> CLIPBackbone:
    """``backbone``, read in ``weights_dtype(dtype)``, with int8 vision linears for ``INT8`` (in place)."""
    return quantize_vision_linears(backbone) if dtype == INT8 else backbone


def text_on_the_fast_route(backbone: CLIPBackbone, dtype) -> CLIPBackbone:
    """For serving only (training keeps float32 text): the text transformer in bfloat16 next to a bfloat16 vision
    tower, int8 linears next to int8 ones, so a new product name's 420-prompt ensemble does not keep a request
    waiting; its features stay within cosine 0.999 of float32 (benchmarks/bench_new_name.py)."""
    if dtype == INT8:
        return quantize_text_linears(backbone)
    return backbone.set_text_dtype(torch.bfloat16) if dtype == torch.bfloat16 else backbone


def quantize_vision_linears(backbone: CLIPBackbone) -> CLIPBackbone:
    """PyTorch dynamic int8 quantisation of the vision transformer's linear layers (~99% of its FLOPs), in place."""
    _quantize_linears(backbone.model.vision_model.encoder)
    return backbone


def quantize_text_linears(backbone: CLIPBackbone) -> CLIPBackbone:
    """The same for the text transformer's linear layers (what a new name's prompt ensemble spends its time in)."""
    _quantize_linears(backbone.model.text_model.encoder)
    return backbone


def _quantize_linears(encoder: torch.nn.Module) -> None:
    """Run by oneDNN's int8 kernels, which use what the CPU has (VNNI, AVX2) and honour ONEDNN_MAX_CPU_ISA.

    One transformer block at a time, so each block's float32 weights are freed before the next is quantised."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = "onednn"
    with warnings.catch_warnings():
        # torch deprecates its quantised tensors in favour of torchao (not a zsad dependency); the modules it builds
        # here are the ones zsad measures and serves (benchmarks/bench_deploy.py).
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning)
        for block in encoder.layers:
            # Per-channel weight scales: as fast as one scale per matrix, and closer to float32 (full-size random CLIP on
            # AVX2: image-score difference 0.0083 vs 0.0104 for StackCLIP, 0.014 vs 0.020 for GenCLIP).
            replaced = [module for module in block.modules() if isinstance(module, torch.nn.Linear)]
            quantize_dynamic(block, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
            for linear in replaced:
                # The qconfig quantize_dynamic gives each module closes over that module: a reference cycle that
                # kept every float32 Linear alive until a full garbage collection (a load peaking at 1.3x float32).
                del linear.qconfig
            release_free_memory()  # the block's float32 weights, before the next block's int8 ones are made


def release_free_memory() -> bool:
    """Hand the pages glibc's malloc holds free back to the system now (``malloc_trim(0)``); after freeing many
    buffers below the mmap threshold (a model's float32 weights, replaced one layer at a time by int8 ones) the
    heap otherwise keeps them, and the process's peak grows by what the next allocations cannot fit into.
    Returns False, doing nothing, where the C library has no ``malloc_trim`` (not glibc)."""
    # Written by hand: no library exposes malloc_trim.
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return False
    return bool(malloc_trim(0))
