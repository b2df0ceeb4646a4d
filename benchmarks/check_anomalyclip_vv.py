"""Once-off check of ``CLIPBackbone.encode_image(..., vv_attention_from=K)`` against AnomalyCLIP's own vision tower
(github zqhang/AnomalyCLIP, ``AnomalyCLIP_lib/AnomalyCLIP.py``) on the same random weights, at the native size.

    python benchmarks/check_anomalyclip_vv.py PATH/TO/AnomalyCLIP_lib/AnomalyCLIP.py [--clip-seed 0]

Their module imports ``thop`` (a FLOP counter) after the vision classes; only the code before that import is run.
The tiny random CLIP stands in for real weights (docs/METHODS.md, "Checking V-V against AnomalyCLIP's code").
"""

import argparse
import copy
import tempfile
import types

import torch
from transformers import CLIPModel

from zsad.modeling.clip_backbone import CLIPBackbone
from zsad.testing import save_tiny_clip


def anomalyclip_module(path: str) -> types.ModuleType:
    source = open(path, encoding="utf-8").read()
    module = types.ModuleType("anomalyclip_vision")
    exec(compile(source[: source.index("from thop import profile")], path, "exec"), module.__dict__)
    return module


def their_tower(module, clip: CLIPModel):
    """Their VisionTransformer with the (unfolded) transformers CLIP's vision weights."""
    vision, config = clip.vision_model, clip.config.vision_config
    tower = module.VisionTransformer(config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers,
                                     config.num_attention_heads, clip.config.projection_dim)
    with torch.no_grad():
        tower.conv1.weight.copy_(vision.embeddings.patch_embedding.weight)
        tower.class_embedding.copy_(vision.embeddings.class_embedding)
        tower.positional_embedding.copy_(vision.embeddings.position_embedding.weight)
        for theirs, ours in ((tower.ln_pre, vision.pre_layrnorm), (tower.ln_post, vision.post_layernorm)):
            theirs.load_state_dict(ours.state_dict())
        tower.proj.copy_(clip.visual_projection.weight.t())
        for block, layer in zip(tower.transformer.resblocks, vision.encoder.layers):
            attention = layer.self_attn
            block.attn.in_proj_weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
            block.attn.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
            block.attn.out_proj.load_state_dict(attention.out_proj.state_dict())
            block.ln_1.load_state_dict(layer.layer_norm1.state_dict())
            block.ln_2.load_state_dict(layer.layer_norm2.state_dict())
            # Their MLP is 4x wide as in every OpenAI CLIP; the tiny CLIP's is 2x, so its linears replace theirs.
            block.mlp.c_fc, block.mlp.c_proj = copy.deepcopy(layer.mlp.fc1), copy.deepcopy(layer.mlp.fc2)
    return tower.eval()


def main(path: str, seed: int) -> None:
    module = anomalyclip_module(path)
    with tempfile.TemporaryDirectory() as folder:
        clip_path = save_tiny_clip(folder, seed=seed)
        clip = CLIPModel.from_pretrained(clip_path).eval()
        backbone = CLIPBackbone.from_pretrained(str(clip_path))
    config = clip.config.vision_config
    layers = list(range(1, config.num_hidden_layers + 1))
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(seed))
    print(f"tiny CLIP seed {seed}: {config.num_hidden_layers} blocks, width {config.hidden_size}, {config.image_size} px")
    print("| K | DPAM_layer | largest difference of projected patch tokens (all blocks) | largest token value |\n|---|---|---|---|")
    for start in layers:
        dpam_layer = config.num_hidden_layers - start + 2
        tower = their_tower(module, clip)
        tower.DAPM_replace(dpam_layer)
        _, theirs = tower(pixels, layers, DPAM_layer=dpam_layer)
        with torch.no_grad():
            ours = backbone.encode_image(pixels, layers, vv_attention_from=start)
            ours = [backbone.project_patch_tokens(tokens) for tokens in ours.layer_tokens]
        difference = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
        print(f"| {start} | {dpam_layer} | {difference:.2e} | {max(t.abs().max().item() for t in theirs):.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("anomalyclip_py", help="path of AnomalyCLIP_lib/AnomalyCLIP.py from github zqhang/AnomalyCLIP")
    parser.add_argument("--clip-seed", type=int, default=0)
    arguments = parser.parse_args()
    main(arguments.anomalyclip_py, arguments.clip_seed)
