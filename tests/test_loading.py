"""zsad.runtime.loading: the runtime value object and int8 loading."""

import warnings

import pytest
import torch

from zsad import ZSADError
from zsad.modeling.precision import cpu_has_native_bf16
from zsad.runtime.loading import INT8, Runtime, load_backbone


def test_runtime_resolves_device_and_precision_once_in_one_vocabulary():
    assert Runtime.resolve("cpu", "float32") == Runtime(torch.device("cpu"), "float32")
    assert Runtime.resolve("cpu", "int8").dtype == INT8
    assert Runtime.resolve("cpu", "auto").precision == ("bfloat16" if cpu_has_native_bf16() else "int8")
    with pytest.raises(ZSADError, match="precision must be one of"):
        Runtime.resolve("cpu", "fp32")


@pytest.mark.parametrize(("onednn_cap", "native"), [(None, True), ("AVX512_CORE_VNNI", False), ("avx2", False), ("AVX512_CORE_AMX", True)])
def test_native_bf16_needs_the_instructions_and_onednn_allowed_to_use_them(monkeypatch, onednn_cap, native):
    """A CPU with AMX whose oneDNN is capped below its bf16 kernels (how an AVX512 CPU without BF16 is emulated, or
    how a user keeps oneDNN off AMX) gets emulated bf16 matrix products: auto must not choose bfloat16 there."""
    from zsad.modeling import precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    if onednn_cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_cap)
    assert precision.cpu_has_native_bf16() is native
    assert Runtime.resolve("cpu", "auto").precision == ("bfloat16" if native else "int8")


@pytest.mark.parametrize(("cpuinfo", "onednn_cap", "may"), [
    ("flags : fpu avx2 fma avx512f avx512_vnni", None, True),
    ("flags : fpu avx2 fma avx_vnni", None, True),
    ("flags : fpu avx2 fma avx512f", None, False),  # AVX512 without VNNI (Skylake-SP), or AVX2 alone
    ("flags : fpu avx2 fma avx512f avx512_vnni amx_int8", "AVX2", False),  # oneDNN capped below VNNI
    (None, None, True),  # no /proc/cpuinfo: measuring decides
])
def test_int8_dot_products_read_from_the_cpu_flags_and_onednn_cap(monkeypatch, cpuinfo, onednn_cap, may):
    from zsad.modeling import precision

    class CPUInfo:
        def __init__(self, path):
            pass

        def read_text(self):
            if cpuinfo is None:
                raise FileNotFoundError("/proc/cpuinfo")
            return cpuinfo

    monkeypatch.setattr(precision, "Path", CPUInfo)
    if onednn_cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_cap)
    assert precision.cpu_may_have_int8_dot_products() is may


def test_int8_loading_quantises_every_vision_linear_and_warns_nothing(tiny_clip_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's quantised-tensor deprecation is a UserWarning
        backbone = load_backbone(str(tiny_clip_path), dtype=INT8)
    blocks = backbone.model.vision_model.encoder.layers
    linears = [module for block in blocks for module in block.modules() if isinstance(module, torch.nn.Linear)]
    quantised = [module for block in blocks for module in block.modules() if isinstance(module, torch.ao.nn.quantized.dynamic.Linear)]
    assert not linears and len(quantised) == 6 * len(blocks)  # q, k, v, out, fc1, fc2 per block


def test_int8_loading_frees_each_blocks_float32_linears_before_the_next_block(tiny_clip_path):
    """quantize_dynamic leaves the Linears it replaces in a reference cycle; left to the cyclic collector, every
    block's float32 weights stayed alive next to the int8 ones (a full-size int8 load peaked at 1.3x float32)."""
    import gc
    import weakref

    from zsad.modeling.clip_backbone import CLIPBackbone
    from zsad.modeling.precision import quantize_vision_linears

    backbone = CLIPBackbone.from_pretrained(str(tiny_clip_path))
    weights = [weakref.ref(module.weight) for module in backbone.model.vision_model.encoder.modules() if isinstance(module, torch.nn.Linear)]
    gc.disable()  # the collector must not run on its own in between: the quantisation has to free them itself
    try:
        quantize_vision_linears(backbone)
        alive = [reference for reference in weights if reference() is not None]
    finally:
        gc.enable()
    assert weights and not alive
