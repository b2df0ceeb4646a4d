"""The vision pass (``CLIPBackbone.encode_image_streams``): one explicit loop over the blocks.

``fixtures/vision_pass_hooks.safetensors`` holds the outputs of the previous implementation (forward hooks on the
stock transformers blocks, commit 1731561) on the session's tiny CLIP: the loop must give the same numbers, in float32,
bfloat16 and with int8 linears, for stock taps, value-value streams, several streams in one pass, a skipped last block
and sizes other than the native one.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zsad import CLIPBackbone
from zsad.modeling.precision import quantize_vision_linears

FIXTURE = load_file(Path(__file__).parent / "fixtures" / "vision_pass_hooks.safetensors")
CASES = {  # name: (image size, {vv_attention_from: layers})
    "native_stock": (56, {None: [1, 2, 3, 4]}),
    "stock_all": (112, {None: [1, 2, 3, 4]}),
    "stock_no_last": (112, {None: [1, 3]}),
    "vv2": (112, {2: [1, 2, 3, 4]}),
    "vv3_last": (84, {3: [2, 4]}),
    "vv1_only": (112, {1: [1, 2, 3, 4]}),
    "two_streams": (112, {None: [1, 2, 3, 4], 2: [2, 3, 4], 4: [4]}),
}
FEW = ("stock_all", "vv3_last", "two_streams")
# float32: the same kernels in the same order; bfloat16 / int8: the fixture went through the same casts and kernels,
# so only reduction order may differ.
TOLERANCES = {"float32": 1e-5, "bfloat16": 2e-2, "int8": 1e-4}


@pytest.fixture(scope="module")
def backbones(tiny_clip_path):
    float32 = CLIPBackbone.from_pretrained(str(tiny_clip_path))
    for name, value in float32.model.vision_model.state_dict().items():
        torch.testing.assert_close(value.double().sum().reshape(1), FIXTURE[f"weights.{name}"],
                                   msg=f"The tiny CLIP's {name} changed: the pinned outputs no longer apply.")
    return {
        "float32": float32,
        "bfloat16": CLIPBackbone.from_pretrained(str(tiny_clip_path), dtype=torch.bfloat16),
        "int8": quantize_vision_linears(CLIPBackbone.from_pretrained(str(tiny_clip_path))),
    }


def encode(backbone, name):
    size, streams = CASES[name]
    with torch.inference_mode():
        return backbone.encode_image_streams(FIXTURE[f"pixels.{size}"], streams)


@pytest.mark.parametrize("precision,name", [("float32", name) for name in CASES] + [(p, n) for p in ("bfloat16", "int8") for n in FEW])
def test_loop_gives_the_hook_based_numbers(backbones, precision, name):
    tolerance = TOLERANCES[precision]
    for start, features in encode(backbones[precision], name).items():
        for layer, tokens in zip(features.layers, features.layer_tokens):
            expected = FIXTURE[f"{precision}.{name}.{start}.{layer}"]
            assert tokens.shape == expected.shape
            torch.testing.assert_close(tokens.float(), expected, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(features.image_embeds.float(), FIXTURE[f"{precision}.{name}.{start}.embeds"],
                                   atol=tolerance, rtol=tolerance)


def test_stock_taps_equal_transformers_hidden_states(backbones):
    backbone = backbones["float32"]
    pixels = FIXTURE["pixels.112"]
    with torch.inference_mode():
        stock = backbone.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        features = backbone.encode_image(pixels, [1, 2, 3, 4])
    for layer, tokens in zip(features.layers, features.layer_tokens):
        torch.testing.assert_close(tokens, stock.hidden_states[layer], atol=1e-5, rtol=1e-5)


def test_bilinear_positions_differ_from_bicubic_only_off_the_native_grid(backbones):
    backbone = backbones["float32"]
    native = backbone.position_embeddings(4, "bilinear")
    assert torch.equal(native, backbone.position_embeddings(4, "bicubic"))
    table = backbone.model.vision_model.embeddings.position_embedding.weight
    # Doubling a 4 x 4 grid without aligned corners: output cell 1 lies a quarter of the way from input cell 0 to 1.
    doubled = backbone.position_embeddings(8, "bilinear")[0, 1:].reshape(8, 8, -1)
    grid = table[1:].reshape(4, 4, -1)
    torch.testing.assert_close(doubled[1, 1], 0.75 * 0.75 * grid[0, 0] + 0.75 * 0.25 * (grid[0, 1] + grid[1, 0]) + 0.0625 * grid[1, 1])
    assert not torch.allclose(doubled, backbone.position_embeddings(8, "bicubic")[0, 1:].reshape(8, 8, -1))


def test_threads_share_nothing_but_weights(backbones):
    """8 threads, each its own size and streams, 20 calls each: every result equals the sequential one."""
    backbone = backbones["float32"]
    jobs = [name for name in CASES for _ in range(2)] + ["two_streams"] * 2
    expected = {name: encode(backbone, name) for name in CASES}

    def same(name):
        for start, features in encode(backbone, name).items():
            reference = expected[name][start]
            if not all(torch.equal(a, b) for a, b in zip(features.layer_tokens, reference.layer_tokens)):
                return False
            if not torch.equal(features.image_embeds, reference.image_embeds):
                return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(same, jobs * 10))
    assert len(results) == 160 and all(results)
