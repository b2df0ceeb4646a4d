"""A tiny random CLIP with the real one's structure, for offline tests and UI work (``app.py --tiny``,
``zsad tiny-clip``): no download needed.

```python
>>> from zsad.tiny_clip import save_tiny_clip
>>> path = save_tiny_clip("/tmp/tiny-clip")   # model + tokenizer + image processor
>>> model = zsad.ZeroShotCLIPModel.from_clip(path, image_size=112)
```
"""

import re
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from .modeling.prompting import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Stored in the tiny CLIP's config.json, so every surface recognises it wherever it is loaded from (zsad.provenance).
TINY_RANDOM_MARKER = "zsad_tiny_random"
# (vision layers, width, patch) of the tiny CLIP: recognised by shape too, e.g. in a checkpoint trained on it.
TINY_VISION_SHAPE = (4, 48, 14)
# Words the tests and the synthetic datasets use, so the tiny tokenizer splits them like a real one would.
EXTRA_WORDS = (
    "object damaged bottle cable capsule carpet grid hazelnut leather metal nut pill screw tile toothbrush "
    "transistor wood zipper candle capsules cashew chewinggum fryum macaroni pcb pipe tube fabric plate disk"
)


def tiny_tokenizer() -> CLIPTokenizer:
    """A deterministic byte-level BPE CLIPTokenizer in which every word of the prompts is one token.

    Built by hand because CLIP's real vocabulary cannot be downloaded offline, and a trained BPE
    (tokenizers' trainer) breaks ties differently from one process to the next.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = [*SPECIAL_TOKENS, *alphabet, *(char + "</w>" for char in alphabet)]
    merges: list[tuple[str, str]] = []
    for word in sorted(_prompt_words()):
        built = word[0]
        for position, char in enumerate(word[1:], start=1):
            right = char + "</w>" if position == len(word) - 1 else char
            if (built, right) not in merges:
                merges.append((built, right))
                pieces.append(built + right)
            built += right
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _prompt_words() -> set[str]:
    """Lower-case words of the prompt templates, state phrases and common category names (longer than 1 char)."""
    text = " ".join([*TEMPLATES, *NORMAL_STATES, *ABNORMAL_STATES, EXTRA_WORDS]).lower()
    return {word for word in re.findall(r"[a-z]+", text) if len(word) > 1}


def tiny_clip_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPConfig:
    """4 vision layers (so the quarter points are 1, 2, 3, 4), 14-px patches like ViT-L/14, width 32."""
    text_config = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    layers, width, patch = TINY_VISION_SHAPE
    vision_config = dict(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4, image_size=56, patch_size=patch,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=24, **{TINY_RANDOM_MARKER: True})


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP (model, tokenizer, image processor) to ``directory`` and return its path."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    config = tiny_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(directory)
    return directory
