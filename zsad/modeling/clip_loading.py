"""Loading CLIP for zsad: the vision tower in the chosen precision and the rest in float32, read one tensor at a time,
quick-GELU folded into one SiLU, and the backbone's own pixel statistics (used by ``clip_backbone.CLIPBackbone``)."""

from contextlib import ExitStack, contextmanager

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoImageProcessor, CLIPConfig, CLIPModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file
from transformers.utils.hub import get_checkpoint_shard_files

from .image_processing_zsad import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

QUICK_GELU_SCALE = 1.702


def image_normalisation(name_or_path: str, revision: str | None) -> tuple[tuple, tuple]:
    """The backbone's pixel mean/std from its image processor config, OpenAI's values if it has none."""
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, revision=revision)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError):
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


class CLIPModelWithFloat32Text(CLIPModel):
    """``CLIPModel`` whose text side stays float32 whatever ``dtype`` it is loaded in, so that loading the
    vision tower in bfloat16 never rounds the text weights (see ``CLIPBackbone.set_vision_dtype``)."""

    _keep_in_fp32_modules_strict = ["text_model", "text_projection", "visual_projection", "logit_scale"]


def safetensors_files(name_or_path: str, revision: str | None) -> list[str] | None:
    """Local paths of the checkpoint's safetensors file(s) (downloaded if needed), or None if it has none."""
    single = cached_file(name_or_path, SAFE_WEIGHTS_NAME, revision=revision, _raise_exceptions_for_missing_entries=False)
    if single:
        return [single]
    index = cached_file(name_or_path, SAFE_WEIGHTS_INDEX_NAME, revision=revision, _raise_exceptions_for_missing_entries=False)
    return get_checkpoint_shard_files(name_or_path, index, revision=revision)[0] if index else None


# Prompts read a few dozen rows of this table. Memory-mapped (privately, so copy-on-write), it costs the pages
# of those rows instead of its full size (146 MiB for CLIP's 49,408 x 768 float32 table).
SPARSELY_READ_WEIGHTS = ("text_model.embeddings.token_embedding.weight",)


@contextmanager
def read_lazily(files: list[str]):
    """The checkpoint as a {name: slice} state dict read with pread, one tensor at a time, except the
    sparsely read weights, which are memory-mapped tensors that transformers keeps as they are.

    transformers memory-maps whole checkpoints; converting a float32 file to bfloat16 then keeps every mapped page
    of the file resident until loading ends (1.2 GB of extra peak RSS for ViT-L/14). Reading each tensor with pread
    keeps one float32 tensor at a time. transformers has no option for this, hence the state dict of slices.
    """
    with ExitStack() as stack:
        state_dict = {}
        for file in files:
            reader = stack.enter_context(safe_open(file, framework="pt", device="cpu", backend="pread"))
            state_dict.update({name: reader.get_slice(name) for name in reader.keys()})
            with safe_open(file, framework="pt", device="cpu") as mapper:
                state_dict.update({name: mapper.get_tensor(name) for name in SPARSELY_READ_WEIGHTS if name in mapper.keys()})
        yield state_dict


def load_clip(name_or_path: str, revision: str | None, dtype: torch.dtype) -> CLIPModel:
    """CLIP with its vision tower in ``dtype`` and everything else in float32, read one tensor at a time."""
    options = dict(revision=revision, dtype=dtype, attn_implementation="sdpa")
    files = safetensors_files(name_or_path, revision)
    if files is None:  # a PyTorch-pickle-only checkpoint: transformers' own loader
        return CLIPModelWithFloat32Text.from_pretrained(name_or_path, **options)
    config = CLIPConfig.from_pretrained(name_or_path, revision=revision)
    with read_lazily(files) as state_dict:
        clip = CLIPModelWithFloat32Text.from_pretrained(None, config=config, state_dict=state_dict, **options)
    clip.config.name_or_path = name_or_path  # what a path-based load records; zsad names the backbone with it
    return clip


def fold_quick_gelu(vision_model: nn.Module) -> None:
    """Run each MLP's quick-GELU as one SiLU kernel instead of three elementwise passes.

    quick_gelu(x) = x * sigmoid(1.702 x) = silu(1.702 x) / 1.702, so fc1 is scaled by 1.702 and fc2's weight
    by 1 / 1.702 (in float32, then cast back). The three passes over the (tokens, 4096) activations took 20-26%
    of a bfloat16 ViT-L/14 forward on CPU (benchmarks/bench_inference.py).
    """
    for layer in vision_model.encoder.layers:
        mlp = layer.mlp
        for tensor, factor in ((mlp.fc1.weight, QUICK_GELU_SCALE), (mlp.fc1.bias, QUICK_GELU_SCALE),
                               (mlp.fc2.weight, 1 / QUICK_GELU_SCALE)):
            tensor.data.copy_((tensor.data.float() * factor).to(tensor.dtype))
        mlp.activation_fn = nn.SiLU(inplace=True)  # on fc1's output, which nothing else reads
