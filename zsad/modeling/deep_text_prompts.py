"""CLIP's text encoder with learned tokens in two places (AnomalyCLIP's object-agnostic prompts, docs/METHODS.md):
context vectors that replace the placeholder words of the input, and deep prompt tokens that replace the same
positions again at the input of deeper blocks.

Its own loop over the text blocks, because transformers' encoder runs them in one call with no way to rewrite
tokens between blocks; nothing is stored on the modules, so one backbone serves several threads.
"""

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask


def end_token_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Position of each prompt's first end token (padding may use the same id)."""
    return (input_ids == eos_token_id).int().argmax(dim=-1)


def encode_with_deep_prompts(
    backbone,
    input_ids: torch.Tensor,
    context: torch.Tensor,
    deep_prompts: torch.Tensor,
    round_deep_prompts_to_float16: bool = True,
) -> torch.Tensor:
    """(S, P) L2-normalised end-token features of S prompts.

    ``input_ids`` (S, T) hold placeholders at positions 1..n_ctx; ``context`` (S, n_ctx, D) replaces their word
    embeddings. ``deep_prompts`` (depth - 1, length, D): set k replaces positions 1..length at the input of text
    block k + 2 (1-based; the first block sees the context alone), rounded to float16 first when asked (the
    authors' ``.half()``). Gradients reach ``context`` and ``deep_prompts``, never the frozen backbone.
    """
    text_model = backbone.model.text_model
    embeds = text_model.embeddings.token_embedding(input_ids)
    n_ctx = context.shape[1]
    embeds = torch.cat([embeds[:, :1], context.to(embeds.dtype), embeds[:, 1 + n_ctx:]], dim=1)
    hidden = text_model.embeddings(inputs_embeds=embeds).to(backbone.text_dtype)
    # (config, inputs_embeds, attention_mask, cache) by position, as CLIPBackbone.encode_text passes them.
    causal_mask = create_causal_mask(text_model.config, hidden, None, None)
    length = deep_prompts.shape[1]
    for index, layer in enumerate(text_model.encoder.layers):
        if 1 <= index <= deep_prompts.shape[0] and length:
            tokens = deep_prompts[index - 1]
            if round_deep_prompts_to_float16:
                tokens = tokens.half()
            tokens = tokens.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], tokens, hidden[:, 1 + length:]], dim=1)
        hidden = layer(hidden, causal_mask, is_causal=True)
    ends = hidden[torch.arange(hidden.shape[0], device=hidden.device), end_token_positions(input_ids, backbone.tokenizer.eos_token_id)]
    ends = text_model.final_layer_norm(ends.float())
    return F.normalize(backbone.model.text_projection(ends), dim=-1)
