import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from zsad import ZSADError
from zsad.modeling.clip_backbone import CLIPBackbone, quarter_point_layers

from conftest import TEST_IMAGE_SIZE


def test_quarter_points():
    assert quarter_point_layers(24) == [6, 12, 18, 24]
    assert quarter_point_layers(4) == [1, 2, 3, 4]
    assert quarter_point_layers(12) == [3, 6, 9, 12]


@pytest.mark.parametrize("size", [TEST_IMAGE_SIZE, 70])
def test_hooked_layers_equal_output_hidden_states(tiny_backbone, size):
    pixels = torch.randn(2, 3, size, size)
    layers = [1, 3, 4]
    reference = tiny_backbone.model.vision_model(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    blocks = tiny_backbone.model.vision_model.encoder.layers
    hooks_before = [len(block._forward_hooks) for block in blocks]
    features = tiny_backbone.encode_image(pixels, layers)
    for tokens, layer in zip(features.layer_tokens, layers):
        torch.testing.assert_close(tokens, reference.hidden_states[layer], rtol=0, atol=1e-6)
    assert features.grid_size == size // 14
    assert features.patch_tokens(0).shape == (2, (size // 14) ** 2, tiny_backbone.vision_config.hidden_size)
    expected_embeds = F.normalize(
        tiny_backbone.model.get_image_features(pixels, interpolate_pos_encoding=True).pooler_output, dim=-1
    )
    torch.testing.assert_close(features.image_embeds, expected_embeds, rtol=0, atol=1e-6)
    # Our hooks are removed after the call.
    assert [len(block._forward_hooks) for block in blocks] == hooks_before


def test_project_patch_tokens_is_post_layernorm_then_projection(tiny_backbone):
    tokens = torch.randn(1, 5, tiny_backbone.vision_config.hidden_size)
    vision = tiny_backbone.model.vision_model
    expected = tiny_backbone.model.visual_projection(vision.post_layernorm(tokens))
    torch.testing.assert_close(tiny_backbone.project_patch_tokens(tokens), expected)


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_patch_projections_compute_in_a_16_bit_towers_dtype_unless_the_head_trains(tiny_clip_path, precision):
    backbone = CLIPBackbone.from_pretrained(str(tiny_clip_path), dtype=getattr(torch, precision))
    head = torch.nn.Linear(backbone.vision_config.hidden_size, 16)
    tokens = torch.randn(2, 9, backbone.vision_config.hidden_size)
    training = backbone.project_patches(head.train(), tokens)
    served = backbone.project_patches(head.eval(), tokens)  # gradients recorded or not: the mode decides
    assert served.dtype == training.dtype == torch.float32 and served.requires_grad
    torch.testing.assert_close(training, head(tokens))
    if precision == "bfloat16":
        rounded = F.linear(tokens.bfloat16(), head.weight.bfloat16(), head.bias.bfloat16()).float()
        assert torch.equal(served, rounded) and not torch.equal(served, training)
    else:
        torch.testing.assert_close(served, training)


def test_text_features_equal_get_text_features(tiny_backbone):
    texts = ["a photo of a bottle.", "a photo of a damaged metal nut with a long scratch on it."]
    ids = tiny_backbone.tokenize(texts)
    features = tiny_backbone.encode_text(ids)
    reference = F.normalize(tiny_backbone.model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-5)


def test_sequences_are_cut_to_the_longest_prompt(tiny_backbone):
    texts = ["a bottle.", "a photo of a damaged bottle."]
    ids = tiny_backbone.tokenize(texts)
    longest = max(len(tiny_backbone.tokenizer(text)["input_ids"]) for text in texts)
    assert ids.shape[1] == longest < 77
    assert tiny_backbone.tokenize(texts, num_placeholders=5).shape[1] == longest + 5
    overlong = tiny_backbone.tokenize(["word " * 200], num_placeholders=12)
    assert overlong.shape[1] == 77
    assert (overlong[0] == tiny_backbone.tokenizer.eos_token_id).any()


def test_injected_embeddings_replace_tokens_and_get_gradients(tiny_backbone):
    ids = tiny_backbone.tokenize(["object.", "damaged object."], num_placeholders=3)
    positions = torch.arange(1, 4)
    prompt = torch.randn(3, tiny_backbone.text_config.hidden_size, requires_grad=True)
    features = tiny_backbone.encode_text(ids, prompt, positions)
    features.sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.parameters())
    # Replacement equal to the placeholder's own embeddings changes nothing.
    own = tiny_backbone.word_embeddings(ids[0, 1:4]).detach()
    torch.testing.assert_close(tiny_backbone.encode_text(ids, own, positions), tiny_backbone.encode_text(ids), atol=1e-6, rtol=0)
    # Per-prompt replacements (B, K, D) differ per row.
    per_row = torch.randn(2, 3, tiny_backbone.text_config.hidden_size)
    assert not torch.allclose(tiny_backbone.encode_text(ids, per_row, positions), features.detach())


@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.randn(1, 3, 112, 98), "square"),
        (torch.randn(0, 3, 112, 112), "empty"),
        (torch.randn(1, 3, 0, 0), "empty"),
        (torch.randn(1, 1, 112, 112), "tensor"),
        (torch.randn(1, 3, 8, 8), "smaller than one"),
    ],
)
def test_bad_pixel_values_raise_clear_errors(tiny_backbone, pixels, message):
    with pytest.raises(ZSADError, match=message):
        tiny_backbone.encode_image(pixels, [1, 2])


def test_bad_layers_raise(tiny_backbone):
    with pytest.raises(ZSADError, match="1..4"):
        tiny_backbone.encode_image(torch.randn(1, 3, 56, 56), [0, 5])


def test_backbone_stays_frozen_and_in_eval_mode(tiny_backbone):
    tiny_backbone.train(True)
    assert not tiny_backbone.training and not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.parameters())


def _assert_weights(backbone, reference, vision_dtype):
    """Vision tower in ``vision_dtype`` (rounded from the reference), everything else float32 and exact."""
    expected = dict(reference.model.named_parameters())
    for name, parameter in backbone.model.named_parameters():
        vision = name.startswith("vision_model.")
        dtype = vision_dtype if vision else torch.float32
        assert parameter.dtype == dtype, name
        # The folded quick-GELU scale is applied after the cast, so a vision weight may differ by one rounding.
        torch.testing.assert_close(parameter, expected[name].to(dtype), rtol=2**-7 if vision else 0, atol=0)


def test_folded_quick_gelu_gives_the_stock_vision_tower(tiny_clip_path, tiny_backbone):
    stock = CLIPModel.from_pretrained(str(tiny_clip_path)).eval()
    assert stock.config.vision_config.hidden_act == "quick_gelu"
    assert all(isinstance(layer.mlp.activation_fn, torch.nn.SiLU) for layer in tiny_backbone.model.vision_model.encoder.layers)
    pixels = torch.randn(2, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = stock.vision_model(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        folded = tiny_backbone.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    for mine, theirs in zip(folded.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_bfloat16_load_rounds_the_vision_tower_only(tiny_clip_path, tiny_backbone):
    _assert_weights(CLIPBackbone.from_pretrained(str(tiny_clip_path), dtype=torch.bfloat16), tiny_backbone, torch.bfloat16)


@pytest.mark.parametrize("layout", ["sharded", "pickle"])
def test_sharded_and_pickle_checkpoints_load_the_same_weights(tiny_clip_path, tiny_backbone, tmp_path, layout):
    for file in tiny_clip_path.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, tmp_path / file.name)
    stock = CLIPModel.from_pretrained(str(tiny_clip_path))
    if layout == "sharded":
        stock.save_pretrained(tmp_path, max_shard_size="100KB")
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    else:
        torch.save(stock.state_dict(), tmp_path / "pytorch_model.bin")
    assert not (tmp_path / "model.safetensors").exists()
    _assert_weights(CLIPBackbone.from_pretrained(str(tmp_path), dtype=torch.bfloat16), tiny_backbone, torch.bfloat16)


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``tensor``'s data, or None for anonymous memory (Linux)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


def test_token_embedding_table_stays_a_copy_on_write_mapping_of_the_checkpoint(tiny_clip_path, tiny_backbone, tmp_path):
    shutil.copytree(tiny_clip_path, tmp_path, dirs_exist_ok=True)
    checkpoint = tmp_path / "model.safetensors"
    original_bytes = checkpoint.read_bytes()
    backbone = CLIPBackbone.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    table = backbone.word_embeddings.weight
    assert _mapped_file(table) == str(checkpoint)
    assert _mapped_file(backbone.model.text_model.encoder.layers[0].mlp.fc1.weight) is None  # read, not mapped
    torch.testing.assert_close(table, tiny_backbone.word_embeddings.weight, rtol=0, atol=0)
    with torch.no_grad():
        table.add_(1.0)
    assert checkpoint.read_bytes() == original_bytes


def test_packed_prompts_equal_the_padded_batch(tiny_backbone):
    texts = ["a bottle.", "a photo of a damaged metal nut with a long scratch on it.", "a photo of the cable.",
             "there is a broken screw in the scene.", "a pill.", "a close-up photo of a flawless pill."]
    reference = tiny_backbone.encode_text(tiny_backbone.tokenize(texts))
    torch.testing.assert_close(tiny_backbone.encode_prompts(texts, 128), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_serving_puts_the_text_tower_on_the_precision_fast_route_training_keeps_float32(tiny_clip_path, tiny_backbone, precision):
    from zsad.modeling.prompting import prompt_ensemble_features
    from zsad.runtime.loading import Runtime, load_backbone, shared_backbone

    runtime = Runtime.resolve("cpu", precision)
    dtype = runtime.dtype
    served = shared_backbone(str(tiny_clip_path), [], runtime)
    text = served.model.text_model
    quantised = [module for module in text.encoder.modules()
                 if type(module).__name__ == "Linear" and module.__module__.startswith("torch.ao.nn.quantized")]
    assert len(quantised) == (6 * served.text_config.num_hidden_layers if precision == "int8" else 0)
    assert served.text_dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
    assert text.embeddings.token_embedding.weight.dtype == served.model.text_projection.weight.dtype == torch.float32
    assert load_backbone(str(tiny_clip_path), dtype=dtype).text_dtype == torch.float32  # what train.py loads
    names = ["metal nut", "bottle"]
    similarity = F.cosine_similarity(prompt_ensemble_features(served, names), prompt_ensemble_features(tiny_backbone, names), dim=-1)
    assert similarity.min() >= 0.999


def loop_value_value_layers(backbone, pixels, start):
    """AnomalyCLIP's dual path written out block by block (eager attention, explicit heads): {block: stream tokens}."""
    vision = backbone.model.vision_model
    hidden = vision.pre_layrnorm(vision.embeddings(pixels, interpolate_pos_encoding=True))
    stream, outputs = None, {}
    for number, block in enumerate(vision.encoder.layers, start=1):
        if number == start:
            stream = hidden.clone()
        if stream is not None:
            attention = block.self_attn
            normed = block.layer_norm1(hidden)
            values = attention.v_proj(normed)
            mixed = torch.zeros_like(values)
            width = attention.head_dim
            for head in range(attention.num_heads):
                v = values[..., head * width:(head + 1) * width]
                weights = torch.softmax(v @ v.transpose(-1, -2) * width ** -0.5, dim=-1)
                mixed[..., head * width:(head + 1) * width] = weights @ v
            stream = stream + attention.out_proj(mixed)
            outputs[number] = stream
        hidden = block(hidden, None)
    return outputs


@pytest.mark.parametrize("start", [1, 3])
def test_value_value_stream_equals_a_loop_implementation(tiny_backbone, start):
    pixels = torch.randn(2, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    layers = [1, 2, 3, 4]
    stock = tiny_backbone.encode_image(pixels, layers)
    dense = tiny_backbone.encode_image(pixels, layers, vv_attention_from=start)
    expected = loop_value_value_layers(tiny_backbone, pixels, start)
    assert dense.vv_attention_from == start
    for index, layer in enumerate(layers):
        if layer >= start:
            torch.testing.assert_close(dense.layer_tokens[index], expected[layer], rtol=0, atol=1e-5)
            assert not torch.allclose(dense.layer_tokens[index], stock.layer_tokens[index], atol=1e-3)
        else:
            torch.testing.assert_close(dense.layer_tokens[index], stock.layer_tokens[index], rtol=0, atol=0)
    # The stock class token, from a last block that computes that token alone (its attention sums in another order).
    torch.testing.assert_close(dense.image_embeds, stock.image_embeds, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("layers_by_start", "class_token_only"), [
    ({2: [2, 4]}, True),           # the stream supplies layer 4
    ({None: [1, 3]}, True),        # nothing taps layer 4
    ({None: [4], 2: [2, 4]}, False),  # a stock tap of layer 4 needs every token
])
def test_the_last_block_computes_the_class_token_alone_when_nothing_reads_its_patch_tokens(tiny_backbone, layers_by_start,
                                                                                          class_token_only):
    pixels = torch.randn(2, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    shapes = []
    last = tiny_backbone.model.vision_model.encoder.layers[-1]
    handle = last.mlp.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    try:
        streams = tiny_backbone.encode_image_streams(pixels, layers_by_start)
    finally:
        handle.remove()
    tokens = (TEST_IMAGE_SIZE // tiny_backbone.vision_config.patch_size) ** 2 + 1
    assert shapes == [(2, 1 if class_token_only else tokens, tiny_backbone.vision_config.hidden_size)]
    assert "forward" not in vars(last)  # the block is itself again after the pass
    full = tiny_backbone.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    expected = F.normalize(tiny_backbone.model.visual_projection(tiny_backbone.post_layernorm(full)), dim=-1)
    for features in streams.values():
        torch.testing.assert_close(features.image_embeds, expected, rtol=0, atol=1e-6)


def test_one_pass_serves_several_value_value_starts(tiny_backbone):
    pixels = torch.randn(1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    calls = []
    handle = tiny_backbone.model.vision_model.embeddings.patch_embedding.register_forward_hook(lambda *args: calls.append(1))
    try:
        streams = tiny_backbone.encode_image_streams(pixels, {None: [2, 4], 2: [2, 4], 3: [4]})
    finally:
        handle.remove()
    assert len(calls) == 1
    for start, layers in ((None, [2, 4]), (2, [2, 4]), (3, [4])):
        alone = tiny_backbone.encode_image(pixels, layers, vv_attention_from=start)
        for got, expected in zip(streams[start].layer_tokens, alone.layer_tokens):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(ZSADError, match="vv_attention_from=3, the model asks for 2"):
        streams[3].select([4], 2)


def test_value_value_start_outside_the_depth_is_refused(tiny_backbone):
    with pytest.raises(ZSADError, match="vv_attention_from must be a block number in 1..4"):
        tiny_backbone.encode_image(torch.randn(1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE), [1], vv_attention_from=5)


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_value_value_stream_runs_on_the_routes_precision(tiny_clip_path, tiny_backbone, precision):
    """The extra attention reads the V of the block's own v_proj, so bfloat16 blocks give a bfloat16 stream and int8
    linears an int8-projected one; both stay close to float32."""
    from zsad.modeling.precision import quantize_vision_linears

    backbone = CLIPBackbone.from_pretrained(str(tiny_clip_path))
    backbone = backbone.set_vision_dtype(torch.bfloat16) if precision == "bfloat16" else quantize_vision_linears(backbone)
    pixels = torch.randn(1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast = backbone.encode_image(pixels, [2, 4], vv_attention_from=2)
        exact = tiny_backbone.encode_image(pixels, [2, 4], vv_attention_from=2)
    assert fast.layer_tokens[0].dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
    for got, expected in zip(fast.layer_tokens, exact.layer_tokens):
        assert F.cosine_similarity(got.float().flatten(), expected.flatten(), dim=0) > 0.99
        assert not torch.equal(got.float(), expected)  # the route's own arithmetic, not a float32 detour
