"""AnomalyCLIP's own code (github zqhang/AnomalyCLIP, a local clone) on a random CLIP and a random prompt learner
saved in its format: writes the fixtures ``tests/test_anomalyclip.py`` compares zsad's converted model with.

    python benchmarks/check_anomalyclip.py --anomalyclip PATH/TO/AnomalyCLIP [--out tests/fixtures/anomalyclip]
    python benchmarks/check_anomalyclip.py --anomalyclip PATH/TO/AnomalyCLIP --full   # ViT-L/14@336 at 518 px, prints

Their model (``AnomalyCLIP_lib/AnomalyCLIP.py``), prompt learner (``prompt_ensemble.py``) and map functions
(``get_similarity_map``, ``compute_similarity`` of ``model_load.py``) run as they are; the scoring is ``test.py``'s
loop body. Their package imports torchvision, thop, ftfy and pkg_resources for things this check does not use
(image transforms, FLOP counting, text cleaning, a version test), so those are stubbed. The tiny CLIP's vocabulary
is not CLIP's, so their ``tokenize`` is given one on the tiny tokenizer (their end token must be the largest id,
as in CLIP's vocabulary: the tiny tokenizer here puts the start and end tokens last). ``--full`` uses their own
tokenizer on a random CLIP of ViT-L/14@336's shape and prints the differences (no fixture).
"""

import argparse
import ast
import copy
import importlib
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from scipy.ndimage import gaussian_filter
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from zsad.hub.convert_anomalyclip import convert_anomalyclip
from zsad.modeling.modeling_anomalyclip import AnomalyCLIPModel
from zsad.runtime.tiny_clip import tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "anomalyclip"
TINY = dict(text_layers=4, depth=3, deep_length=4, n_ctx=12, vv_attention_from=1, native=56, resized=70)


# ----- their code -----------------------------------------------------------------------------------------------

def their_modules(clone: Path):
    """(AnomalyCLIP module, prompt_ensemble module, map functions) from the clone, with unused imports stubbed."""
    stubs = {"thop": {"profile": None}, "ftfy": {"fix_text": lambda text: text}}
    for name, attributes in stubs.items():
        sys.modules.setdefault(name, types.SimpleNamespace(**attributes))
    if "pkg_resources" not in sys.modules:
        import packaging.version
        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=types.SimpleNamespace(version=packaging.version))
    package = types.ModuleType("AnomalyCLIP_lib")  # without its __init__ (model_load imports torchvision)
    package.__path__ = [str(clone / "AnomalyCLIP_lib")]
    sys.modules["AnomalyCLIP_lib"] = package
    sys.path.insert(0, str(clone))
    model_module = importlib.import_module("AnomalyCLIP_lib.AnomalyCLIP")
    prompts = importlib.import_module("prompt_ensemble")
    return model_module, prompts, map_functions(clone / "AnomalyCLIP_lib" / "model_load.py")


def map_functions(path: Path) -> types.SimpleNamespace:
    """get_similarity_map and compute_similarity, executed from their source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef)
              and node.name in ("get_similarity_map", "compute_similarity")]
    namespace = {"torch": torch}
    exec(compile(ast.Module(wanted, type_ignores=[]), str(path), "exec"), namespace)
    return types.SimpleNamespace(**{node.name: namespace[node.name] for node in wanted})


def their_model(module, clip: CLIPModel, design: dict):
    """Their AnomalyCLIP with the transformers CLIP's weights (their VisionTransformer rebuilt with the CLIP's head
    count: their class derives it as width // 64, which a tiny CLIP does not have)."""
    text, vision = clip.config.text_config, clip.config.vision_config
    model = module.AnomalyCLIP(clip.config.projection_dim, vision.image_size, vision.num_hidden_layers, 64, vision.patch_size,
                               text.max_position_embeddings, text.vocab_size, text.hidden_size, text.num_attention_heads,
                               text.num_hidden_layers, design_details=design)
    model.visual = module.VisionTransformer(vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers,
                                           vision.num_attention_heads, clip.config.projection_dim)
    with torch.no_grad():
        load_vision(model.visual, clip)
        load_text(model, clip)
    return model.eval()


def load_blocks(blocks, layers) -> None:
    for block, layer in zip(blocks, layers):
        attention = layer.self_attn
        block.attn.in_proj_weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
        block.attn.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
        block.attn.out_proj.load_state_dict(attention.out_proj.state_dict())
        block.ln_1.load_state_dict(layer.layer_norm1.state_dict())
        block.ln_2.load_state_dict(layer.layer_norm2.state_dict())
        block.mlp.c_fc.load_state_dict(layer.mlp.fc1.state_dict())
        block.mlp.c_proj.load_state_dict(layer.mlp.fc2.state_dict())


def load_vision(tower, clip: CLIPModel) -> None:
    vision = clip.vision_model
    tower.conv1.weight.copy_(vision.embeddings.patch_embedding.weight)
    tower.class_embedding.copy_(vision.embeddings.class_embedding)
    tower.positional_embedding.copy_(vision.embeddings.position_embedding.weight)
    tower.ln_pre.load_state_dict(vision.pre_layrnorm.state_dict())
    tower.ln_post.load_state_dict(vision.post_layernorm.state_dict())
    tower.proj.copy_(clip.visual_projection.weight.t())
    load_blocks(tower.transformer.resblocks, vision.encoder.layers)


def load_text(model, clip: CLIPModel) -> None:
    text = clip.text_model
    model.token_embedding.weight.copy_(text.embeddings.token_embedding.weight)
    model.positional_embedding.copy_(text.embeddings.position_embedding.weight)
    model.ln_final.load_state_dict(text.final_layer_norm.state_dict())
    model.text_projection.copy_(clip.text_projection.weight.t())
    load_blocks(model.transformer.resblocks, text.encoder.layers)


def their_scores(module, functions, learner, clip, design, pixels, features_list, dpam_layer, sigma=4):
    """test.py's loop body image by image (its batch size is 1, and its image score reads the first image only):
    (anomaly maps (B, S, S) as their gaussian_filter leaves them, image scores (B,))."""
    results = [their_image_scores(module, functions, learner, clip, design, image[None], features_list, dpam_layer, sigma)
               for image in pixels]
    return torch.cat([maps for maps, _ in results]), torch.cat([scores for _, scores in results])


def their_image_scores(module, functions, learner, clip, design, pixels, features_list, dpam_layer, sigma):
    model = their_model(module, clip, design)  # fresh: their forward resizes the position embeddings in place
    model.visual.DAPM_replace(DPAM_layer=dpam_layer)
    with torch.no_grad():
        prompts, tokenized_prompts, compound_prompts_text = learner(cls_id=None)
        text_features = model.encode_text_learn(prompts, tokenized_prompts, compound_prompts_text).float()
        text_features = torch.stack(torch.chunk(text_features, dim=0, chunks=2), dim=1)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        image_features, patch_features = model.encode_image(pixels, features_list, DPAM_layer=dpam_layer)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_probs = (image_features @ text_features.permute(0, 2, 1) / 0.07).softmax(-1)[:, 0, 1]
        anomaly_maps = []
        for patch_feature in patch_features:
            patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
            similarity, _ = functions.compute_similarity(patch_feature, text_features[0])
            similarity_map = functions.get_similarity_map(similarity[:, 1:, :], pixels.shape[-1])
            anomaly_maps.append((similarity_map[..., 1] + 1 - similarity_map[..., 0]) / 2.0)
        anomaly_map = torch.stack(anomaly_maps).sum(dim=0)
        anomaly_map = torch.stack([torch.from_numpy(gaussian_filter(i, sigma=sigma)) for i in anomaly_map.cpu()], dim=0)
    return anomaly_map, text_probs


# ----- the random CLIP and prompt learner -------------------------------------------------------------------------

def ends_last_tokenizer() -> CLIPTokenizer:
    """The tiny tokenizer with its start and end tokens moved to the largest ids, as in CLIP's vocabulary."""
    tiny = tiny_tokenizer()
    vocab = sorted(tiny.get_vocab().items(), key=lambda item: (item[0] in ("<|startoftext|>", "<|endoftext|>"), item[1]))
    return CLIPTokenizer(vocab={token: index for index, (token, _) in enumerate(vocab)}, merges=_merges(tiny))


def _merges(tokenizer) -> list[tuple[str, str]]:
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in state]


def save_oracle_clip(directory: Path, seed: int) -> Path:
    """A tiny random CLIP whose MLPs are 4x wide (their blocks' width) and whose text has TINY['text_layers'] blocks."""
    tokenizer = ends_last_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=TINY["text_layers"],
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=TINY["native"],
                  patch_size=14)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    size = TINY["native"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(directory)
    return directory


def tokenize_with(tokenizer: CLIPTokenizer):
    """Their ``tokenize`` (ids padded with 0 to 77) on another tokenizer."""

    def tokenize(texts, context_length: int = 77, truncate: bool = False):
        texts = [texts] if isinstance(texts, str) else texts
        result = torch.zeros(len(texts), context_length, dtype=torch.int)
        for row, text in enumerate(texts):
            ids = tokenizer(text)["input_ids"]
            result[row, : len(ids)] = torch.tensor(ids)
        return result

    return tokenize


def their_learner(prompts_module, clip_model, design: dict, seed: int):
    torch.manual_seed(seed)
    return prompts_module.AnomalyCLIP_PromptLearner(clip_model, design).eval()


# ----- runs -----------------------------------------------------------------------------------------------------

def write_fixtures(clone: Path, out: Path, seed: int) -> None:
    """The fixtures on the tiny CLIP, their ``tokenize`` swapped for the tiny tokenizer's meanwhile only (a ``--full``
    run after it in the same process needs their own)."""
    prompts_module = their_modules(clone)[1]
    their_tokenize = prompts_module.tokenize
    try:
        _write_fixtures(clone, out, seed)
    finally:
        prompts_module.tokenize = their_tokenize


def _write_fixtures(clone: Path, out: Path, seed: int) -> None:
    module, prompts_module, functions = their_modules(clone)
    out.mkdir(parents=True, exist_ok=True)
    clip_dir = save_oracle_clip(out / "clip", seed)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    prompts_module.tokenize = tokenize_with(CLIPTokenizer.from_pretrained(clip_dir))
    design = {"Prompt_length": TINY["n_ctx"], "learnabel_text_embedding_depth": TINY["depth"],
              "learnabel_text_embedding_length": TINY["deep_length"]}
    learner = their_learner(prompts_module, their_model(module, clip, design), design, seed)
    torch.save({"prompt_learner": learner.state_dict()}, out / "epoch_15.pth")
    layers = clip.config.vision_config.num_hidden_layers
    dpam_layer = layers - TINY["vv_attention_from"] + 2
    generator = torch.Generator().manual_seed(seed)
    tensors, cases = {}, []
    # (input size, their features_list, images): the authors' last layer at the CLIP's own size and at another (where
    # their bilinear position embeddings matter), and every layer (their paper's setting).
    for size, features_list, count in ((TINY["native"], [layers], 2), (TINY["resized"], [layers], 1),
                                       (TINY["native"], list(range(1, layers + 1)), 1)):
        pixels = torch.randn(count, 3, size, size, generator=generator)
        maps, scores = their_scores(module, functions, learner, clip, design, pixels, features_list, dpam_layer)
        name = f"{size}px_layers_{'_'.join(map(str, features_list))}"
        tensors.update({f"{name}.pixels": pixels, f"{name}.map": maps.float().contiguous(), f"{name}.score": scores.float()})
        cases.append({"name": name, "image_size": size, "feature_layers": features_list})
    save_file(tensors, out / "expected.safetensors")
    meta = {"vv_attention_from": TINY["vv_attention_from"], "dpam_layer": dpam_layer, "sigma": 4, "cases": cases,
            "made_by": "benchmarks/check_anomalyclip.py", "seed": seed}
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    print(compare_with_zsad(out, clip_dir, tensors, cases))


def compare_with_zsad(out: Path, clip_dir: Path, tensors: dict, cases: list) -> str:
    lines = ["| case | max abs map difference | max abs image score difference |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        converted = convert_anomalyclip(out / "epoch_15.pth", Path(folder) / "model", clip=str(clip_dir), trained_on="random",
                                        image_size=TINY["native"])
        for case in cases:
            model = AnomalyCLIPModel.from_pretrained(converted, image_size=case["image_size"],
                                                     smoothing_reference_size=case["image_size"],
                                                     feature_layers=case["feature_layers"], layer_combination="sum")
            with torch.no_grad():
                output = model(tensors[f"{case['name']}.pixels"])
            # Their maps summed over layers exceed 1 with several layers: compared before the output's clipping.
            unclipped = model.combine_layer_maps(output.layer_maps, case["image_size"])
            map_difference = (unclipped - tensors[f"{case['name']}.map"]).abs().max()
            score_difference = (output.image_score - tensors[f"{case['name']}.score"]).abs().max()
            lines.append(f"| {case['name']} | {map_difference:.2e} | {score_difference:.2e} |")
    return "\n".join(lines)


def run_full(clone: Path, seed: int) -> None:
    """ViT-L/14@336 shapes with random weights at 518 px: their code and zsad's converted model, differences printed."""
    module, prompts_module, functions = their_modules(clone)
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                  patch_size=14)
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()
    design = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
    learner = their_learner(prompts_module, their_model(module, clip, design), design, seed)
    pixels = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(seed))
    maps, scores = their_scores(module, functions, learner, clip, design, pixels, [24], dpam_layer=20)
    with tempfile.TemporaryDirectory() as folder:
        clip_dir = Path(folder) / "clip"
        clip.save_pretrained(clip_dir)
        _their_bpe_tokenizer(clone).save_pretrained(clip_dir)
        torch.save({"prompt_learner": learner.state_dict()}, Path(folder) / "full.pth")
        converted = convert_anomalyclip(Path(folder) / "full.pth", Path(folder) / "model", clip=str(clip_dir),
                                        trained_on="random")
        model = AnomalyCLIPModel.from_pretrained(converted)
        with torch.no_grad():
            output = model(pixels)
    print(f"ViT-L/14@336 shapes, random weights, 518 px, features [24], DPAM_layer 20 (vv_attention_from "
          f"{model.config.vv_attention_from}): max |map difference| {(output.anomaly_map - maps).abs().max():.2e}, "
          f"|image score difference| {(output.image_score - scores).abs().max():.2e} (their score {scores.item():.6f})")


def _their_bpe_tokenizer(clone: Path) -> CLIPTokenizer:
    """A transformers CLIPTokenizer with their BPE file's vocabulary and merges (CLIP's own)."""
    simple = importlib.import_module("AnomalyCLIP_lib.simple_tokenizer").SimpleTokenizer()
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    return CLIPTokenizer(vocab=copy.copy(simple.encoder), merges=list(merges))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anomalyclip", required=True, type=Path, help="root of a clone of github zqhang/AnomalyCLIP")
    parser.add_argument("--out", type=Path, default=FIXTURES, help=f"fixture folder (default {FIXTURES})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="also run ViT-L/14@336 shapes at 518 px (random weights; slow)")
    arguments = parser.parse_args()
    write_fixtures(arguments.anomalyclip.resolve(), arguments.out, arguments.seed)
    if arguments.full:
        run_full(arguments.anomalyclip.resolve(), arguments.seed)
