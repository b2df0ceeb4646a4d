"""A tiny random CLIP for offline tests and UI work (no download needed).

```python
>>> from zsad.testing import save_tiny_clip
>>> path = save_tiny_clip("/tmp/tiny-clip")   # model + tokenizer + image processor
>>> model = zsad.ZeroShotCLIPModel.from_clip(path, image_size=112)
```
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from .modeling.prompting import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Words the tests and the synthetic datasets use, so the tiny tokenizer splits them like a real one would.
EXTRA_WORDS = (
    "object damaged bottle cable capsule carpet grid hazelnut leather metal nut pill screw tile toothbrush "
    "transistor wood zipper candle capsules cashew chewinggum fryum macaroni pcb pipe tube fabric plate disk"
)


def _tiny_tokenizer(vocab_size: int) -> CLIPTokenizer:
    """Byte-level BPE learned on the prompt vocabulary, wrapped as a CLIPTokenizer.

    Trained here with the tokenizers library because CLIP's real vocabulary cannot be downloaded offline.
    """
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=SPECIAL_TOKENS[1]))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    corpus = [template.format(state.format("object")) for template in TEMPLATES for state in NORMAL_STATES + ABNORMAL_STATES]
    bpe.train_from_iterator(corpus + [EXTRA_WORDS] * 10, trainer=trainer)
    vocab = bpe.get_vocab()
    # CLIP expects every byte both inside a word and at a word's end.
    for char in pre_tokenizers.ByteLevel.alphabet():
        for piece in (char, char + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPConfig:
    """4 vision layers (so the quarter points are 1, 2, 3, 4), 14-px patches like ViT-L/14, width 32."""
    text_config = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    vision_config = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=14,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=24)


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP (model, tokenizer, image processor) to ``directory`` and return its path."""
    directory = Path(directory)
    tokenizer = _tiny_tokenizer(vocab_size=600)
    config = tiny_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(directory)
    return directory
