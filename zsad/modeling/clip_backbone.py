"""A frozen ``transformers.CLIPModel`` run as one explicit loop over its vision blocks, and a prompt-embedding text encoder.

Example:

```python
>>> backbone = CLIPBackbone.from_pretrained("openai/clip-vit-large-patch14-336")
>>> features = backbone.encode_image(pixel_values, layers=[6, 12, 18, 24])  # any square size
>>> dense = backbone.encode_image(pixel_values, layers=[6, 12, 18, 24], vv_attention_from=6)  # value-value stream
>>> ids = backbone.tokenize(["a photo of a bottle."])
>>> text = backbone.encode_text(ids)  # (1, 768), L2-normalised
```
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPModel
from transformers.masking_utils import create_causal_mask

from .clip_loading import fold_quick_gelu, image_normalisation, load_clip
from .exceptions import ZSADError
from .image_processing_zsad import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .lru_cache import LRUCache
from .prefix_tree import PrefixTreeRow, pack_prefix_trees


def quarter_point_layers(num_layers: int) -> list[int]:
    """The four quarter points of a depth: 6, 12, 18, 24 for 24 layers; 1, 2, 3, 4 for 4."""
    return [round(num_layers * quarter / 4) for quarter in (1, 2, 3, 4)]


@dataclass
class ImageFeatures:
    """What one vision pass gives the method heads.

    ``layer_tokens[i]`` is ``hidden_states[layers[i]]`` of the vision tower, shape (B, 1 + N, D) with the
    class token first, or, for ``layers[i] >= vv_attention_from``, the value-value stream's tokens after that block
    (``CLIPBackbone.encode_image``); ``image_embeds`` is the projected, L2-normalised global embedding (B, P),
    always the stock one; ``class_token`` (B, D) is the last block's stock class token before CLIP's final LayerNorm
    (what AnomalyCLIP projects for its image score).
    """

    layers: list[int]
    layer_tokens: list[torch.Tensor]
    image_embeds: torch.Tensor
    grid_size: int
    image_size: int
    vv_attention_from: int | None = None
    position_interpolation: str = "bicubic"
    class_token: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.image_embeds.shape[0]

    def patch_tokens(self, index: int) -> torch.Tensor:
        """Patch tokens (B, N, D) of the ``index``-th requested layer, class token dropped."""
        return self.layer_tokens[index][:, 1:]

    def select(self, layers: list[int], vv_attention_from: int | None = None, position_interpolation: str = "bicubic") -> "ImageFeatures":
        """The same pass restricted to ``layers`` (each must have been tapped), in that order; the features must
        come from the value-value stream starting at ``vv_attention_from`` (None: the stock tokens), with positions
        resized by ``position_interpolation``."""
        if vv_attention_from != self.vv_attention_from:
            raise ZSADError(f"These image features were encoded with vv_attention_from={self.vv_attention_from}, the model "
                            f"asks for {vv_attention_from}; encode them with the model's vv_attention_from.")
        if position_interpolation != self.position_interpolation:
            raise ZSADError(f"These image features were encoded with position_interpolation={self.position_interpolation!r}, "
                            f"the model asks for {position_interpolation!r}; encode them with the model's setting.")
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise ZSADError(f"These image features hold layers {self.layers}, not {missing}; encode them with every layer needed.")
        tokens = dict(zip(self.layers, self.layer_tokens))
        return ImageFeatures(list(layers), [tokens[layer] for layer in layers], self.image_embeds, self.grid_size,
                             self.image_size, self.vv_attention_from, self.position_interpolation, self.class_token)


def stock_taps(layers_by_start: dict) -> set[int]:
    """The blocks whose stock output some stream reads: every block but the last runs whole anyway; the last runs
    its class token alone unless it is in here."""
    return {layer for start, layers in layers_by_start.items() for layer in layers if start is None or layer < start}


def check_pixel_values(pixel_values: torch.Tensor, patch_size: int) -> None:
    """Raise a ZSADError unless ``pixel_values`` is a (B, 3, S, S) batch with S >= patch size."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ZSADError(f"pixel_values must be a (batch, 3, size, size) tensor, got {shape}.")
    batch, _, height, width = pixel_values.shape
    if batch == 0 or height == 0 or width == 0:
        raise ZSADError(f"pixel_values is empty (shape {tuple(pixel_values.shape)}); pass at least one image.")
    if height != width:
        raise ZSADError(
            f"pixel_values must be square, got {height}x{width}; resize images to the model's "
            "image_size (zsad.AnomalyDetector does this for you)."
        )
    if height < patch_size:
        raise ZSADError(f"Images of {height}px are smaller than one {patch_size}px patch; use a larger image_size.")


POSITION_INTERPOLATIONS = ("bicubic", "bilinear")


def vision_block(block: nn.Module, hidden_states: torch.Tensor, class_token_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One transformers CLIP encoder block, written out: (its output, the values V its attention computed, (B, L, D)).

    The values feed the value-value stream; with ``class_token_only`` the output is the class token's alone (B, 1, D)
    (keys and values are still computed for every token): the global embedding's input when nothing reads the last
    block's patch tokens, which saves the block's attention and most of its linears. Written by hand because
    transformers' block returns neither V nor a class-token-only output; the arithmetic is the stock block's
    (pre-norm attention through ``scaled_dot_product_attention``, then the pre-norm MLP), so its numbers are too.
    """
    attention = block.self_attn
    normed = block.layer_norm1(hidden_states)
    batch, length, width = normed.shape
    heads = (batch, -1, attention.num_heads, attention.head_dim)
    queries = normed[:, :1] if class_token_only else normed
    query = attention.q_proj(queries).view(heads).transpose(1, 2)
    key = attention.k_proj(normed).view(heads).transpose(1, 2)
    values = attention.v_proj(normed)
    mixed = F.scaled_dot_product_attention(query, key, values.view(heads).transpose(1, 2), scale=attention.scale)
    residual = hidden_states[:, :1] if class_token_only else hidden_states
    hidden_states = residual + attention.out_proj(mixed.transpose(1, 2).reshape(batch, -1, width))
    return hidden_states + block.mlp(block.layer_norm2(hidden_states)), values


def value_value_attention(attention: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """AnomalyCLIP's DPAM step: softmax(V V^T * scale) V per head, through the block's ``out_proj`` (no MLP).

    ``values`` are the (B, L, D) V that the block computed from the stock stream's normed tokens, so the step runs in
    the route's own precision (bfloat16, or int8 linears)."""
    batch, length, width = values.shape
    heads = values.view(batch, length, -1, attention.head_dim).transpose(1, 2)
    mixed = F.scaled_dot_product_attention(heads, heads, heads, scale=attention.scale)
    return attention.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))


# Keys (a class name's prompts, a list of prompts) whose frozen text features a backbone keeps (a few KB each).
FROZEN_FEATURES_CACHE_SIZE = 1024
# Nodes per packed row of prompts (``encode_prompts``): enough for a few templates' state prompts to share their
# start, few enough that attention (row length squared) stays a few percent of the row's compute.
PROMPT_TREE_NODES = 128
class CLIPBackbone(nn.Module):
    """Frozen CLIP (always in eval mode, no gradients) plus its tokenizer and pixel normalisation."""

    def __init__(self, clip: CLIPModel, tokenizer, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
        super().__init__()
        self.model = clip
        self.tokenizer = tokenizer
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self._frozen_features = LRUCache(FROZEN_FEATURES_CACHE_SIZE)
        self.model.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, dtype: torch.dtype | None = None):
        """Load CLIP weights and tokenizer from a Hub id or a local folder.

        ``dtype`` (e.g. ``torch.bfloat16``) applies to the vision transformer only, which is nearly all the
        compute; the text encoder, the final norm and the projections stay in float32 (see ``set_vision_dtype``).
        """
        try:
            clip = load_clip(name_or_path, revision, dtype or torch.float32)
            if clip.config.vision_config.hidden_act == "quick_gelu":
                fold_quick_gelu(clip.vision_model)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        except (OSError, ValueError, KeyError) as error:
            raise ZSADError(
                f"Could not load the CLIP backbone '{name_or_path}' (revision {revision or 'default'}): {error}\n"
                "Pass the Hub id of a CLIP model or the path of a local copy (a folder with config.json, the "
                "weights and the tokenizer files), e.g. one saved by CLIPModel.save_pretrained."
            ) from error
        return cls(clip, tokenizer, *image_normalisation(name_or_path, revision)).set_vision_dtype(dtype or torch.float32)

    def frozen_features(self, key: tuple, compute) -> torch.Tensor:
        """``compute()`` once per ``key`` for features of this frozen backbone alone (e.g. a class name's prompt
        ensemble), shared by every model on the backbone; the least recently used go beyond
        ``FROZEN_FEATURES_CACHE_SIZE`` keys. Computed outside inference mode, so training can use them too."""

        def compute_outside_inference_mode():
            with torch.inference_mode(False), torch.no_grad():
                return compute()

        return self._frozen_features.get((key, str(self.device)), compute_outside_inference_mode)

    def frozen_features_per_name(self, kind: tuple, class_names: list[str], compute) -> torch.Tensor:
        """(C, ...) ``compute(name)`` for each name, each cached by ``frozen_features`` under ``(kind, name)``."""
        return torch.stack([self.frozen_features((kind, name), lambda name=name: compute(name)) for name in class_names])

    def set_vision_dtype(self, dtype: torch.dtype) -> "CLIPBackbone":
        """Run the vision transformer in ``dtype``. Its outputs are normalised and projected in float32
        (``post_layernorm``), and text features stay float32: a logit scale of 100 magnifies rounding
        there, while the vision blocks, 99% of the FLOPs, tolerate bfloat16 (benchmarks/bench_inference.py)."""
        for name, child in self.model.named_children():
            child.to(dtype if name == "vision_model" else torch.float32)
        return self

    def set_text_dtype(self, dtype: torch.dtype) -> "CLIPBackbone":
        """Run the text transformer's blocks in ``dtype``; the embeddings (a memory-mapped table), the final norm
        and the projection stay float32. Where bfloat16 is native, this makes a new name's prompt ensemble
        several times faster (benchmarks/bench_new_name.py)."""
        self.model.text_model.encoder.to(dtype)
        return self

    @property
    def text_dtype(self) -> torch.dtype:
        """What the text transformer's blocks compute in (float32 for int8 linears: their activations are)."""
        return self.model.text_model.encoder.layers[0].layer_norm1.weight.dtype

    def train(self, mode: bool = True):
        # The backbone is frozen: its dropout/norm behaviour must not change when a head is trained.
        return super().train(False)

    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def dtype(self) -> torch.dtype:
        """The vision transformer's dtype (what pixel values are cast to)."""
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.text_model.embeddings.token_embedding

    def encode_image(self, pixel_values: torch.Tensor, layers: list[int], vv_attention_from: int | None = None,
                     position_interpolation: str = "bicubic") -> ImageFeatures:
        """Run the vision tower once, keeping only the requested layers' outputs (1-based block numbers).

        With ``vv_attention_from`` K, layers >= K come from the value-value stream started at block K's input
        (``value_value_attention``; AnomalyCLIP's ``DPAM_layer`` = num_layers - K + 2); the other layers and the global
        embedding are the stock ones. ``position_interpolation`` resizes the positional grid for other sizes:
        "bicubic" as transformers does, "bilinear" as AnomalyCLIP's VisionTransformer does.
        """
        return self.encode_image_streams(pixel_values, {vv_attention_from: layers}, position_interpolation)[vv_attention_from]

    def encode_image_streams(self, pixel_values: torch.Tensor, layers_by_start: dict,
                             position_interpolation: str = "bicubic") -> dict:
        """``encode_image`` for several ``vv_attention_from`` values ({K or None: layers}) in one vision pass: each
        extra K costs its own value-value stream, not another pass."""
        self.check_streams(pixel_values, layers_by_start, position_interpolation)
        return self._run_vision_tower(pixel_values.to(device=self.device, dtype=self.dtype), layers_by_start, position_interpolation)

    def check_streams(self, pixel_values: torch.Tensor, layers_by_start: dict, position_interpolation: str) -> None:
        """A ZSADError unless ``encode_image_streams`` can run these pixels, streams and interpolation."""
        num_layers = self.vision_config.num_hidden_layers
        for start, layers in layers_by_start.items():
            if not layers or any(not 1 <= layer <= num_layers for layer in layers):
                raise ZSADError(f"feature_layers must be block numbers in 1..{num_layers}, got {list(layers)}.")
            if start is not None and not 1 <= start <= num_layers:
                raise ZSADError(f"vv_attention_from must be a block number in 1..{num_layers} or None, got {start}.")
        if position_interpolation not in POSITION_INTERPOLATIONS:
            raise ZSADError(f"position_interpolation must be one of {POSITION_INTERPOLATIONS}, got {position_interpolation!r}.")
        check_pixel_values(pixel_values, self.vision_config.patch_size)

    def _run_vision_tower(self, pixel_values: torch.Tensor, layers_by_start: dict, position_interpolation: str) -> dict:
        grid_size = pixel_values.shape[-1] // self.vision_config.patch_size
        positions = self.position_embeddings(grid_size, position_interpolation)
        taps, image_embeds, class_token = self.vision_tower(pixel_values, positions, layers_by_start)
        return {start: ImageFeatures(list(layers), taps[start], image_embeds, grid_size, pixel_values.shape[-1], start,
                                     position_interpolation, class_token)
                for start, layers in layers_by_start.items()}

    def vision_tower(self, pixel_values: torch.Tensor, positions: torch.Tensor, layers_by_start: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The vision tower as one loop over its blocks, with ``positions`` (``position_embeddings``) added to the
        patch embeddings: ({start: [tokens of each of its layers]}, image_embeds, the last block's class token). Every
        intermediate is a local, so concurrent calls share nothing but the (read-only) weights."""
        blocks = self.model.vision_model.encoder.layers
        whole_blocks = stock_taps(layers_by_start)
        taps: dict = {start: {} for start in layers_by_start}
        streams: dict = {}  # value-value stream tokens, by start
        hidden = self.embed_patches(pixel_values, positions)
        for number, block in enumerate(blocks, start=1):
            streams.update({start: hidden for start in layers_by_start if start == number})
            class_token_only = number == len(blocks) and number not in whole_blocks
            hidden, values = vision_block(block, hidden, class_token_only)
            if streams:
                added = value_value_attention(block.self_attn, values)
                streams = {start: tokens + added for start, tokens in streams.items()}
            for start, layers in layers_by_start.items():
                if number in layers:
                    taps[start][number] = streams[start] if start is not None and number >= start else hidden
        image_embeds = F.normalize(self.model.visual_projection(self.post_layernorm(hidden[:, 0])), dim=-1)
        return {start: [taps[start][layer] for layer in layers] for start, layers in layers_by_start.items()}, image_embeds, hidden[:, 0]

    def embed_patches(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The tokens entering the first block (B, 1 + G*G, D): class token and patch embeddings, plus ``positions``
        (``position_embeddings`` for the G x G grid), through CLIP's pre-block LayerNorm."""
        vision = self.model.vision_model
        embeddings = vision.embeddings
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        class_token = embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([class_token, patches], dim=1) + positions.to(patches.dtype)
        return vision.pre_layrnorm(tokens)

    def position_embeddings(self, grid: int, position_interpolation: str = "bicubic", dtype: torch.dtype | None = None) -> torch.Tensor:
        """(1, 1 + grid*grid, D) positional embeddings, the patch part resized from CLIP's native grid (corners
        not aligned, as transformers and AnomalyCLIP both do), computed in ``dtype`` (default: the table's)."""
        table = self.model.vision_model.embeddings.position_embedding.weight
        table = table.to(dtype) if dtype is not None else table
        native = round((table.shape[0] - 1) ** 0.5)
        if grid == native:
            return table[None]
        patch_table = table[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(patch_table, size=(grid, grid), mode=position_interpolation, align_corners=False)
        return torch.cat([table[None, :1], resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)

    def post_layernorm(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's final vision LayerNorm, computed in float32 whatever the vision dtype."""
        norm = self.model.vision_model.post_layernorm
        return F.layer_norm(tokens.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)

    def project_patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's own patch projection: post_layernorm then visual_projection (not normalised)."""
        return self.project_patches(self.model.visual_projection, self.post_layernorm(tokens))

    def project_patches(self, head: nn.Linear, normed_tokens: torch.Tensor) -> torch.Tensor:
        """``head`` (a patch projection, float32) on (B, N, D) normed patch tokens, returned in float32.

        Next to a 16-bit vision tower and with ``head`` in eval mode (``from_pretrained`` models, every zsad surface,
        the pipeline) it computes in that dtype: the tokens already carry its rounding, and on CPUs with native bf16 a
        float32 projection of every tapped layer took 30 ms of a baseline call's 1.07 s (full-size CLIP, 518 px). A
        head being trained (train mode), and float32 or int8 towers, keep float32."""
        if self.dtype in (torch.bfloat16, torch.float16) and not head.training:
            bias = None if head.bias is None else head.bias.to(self.dtype)
            return F.linear(normed_tokens.to(self.dtype), head.weight.to(self.dtype), bias).float()
        return head(normed_tokens.to(head.weight.dtype))

    def tokenize(self, texts: list[str], num_placeholders: int = 0) -> torch.Tensor:
        """Token ids padded to the longest prompt (not to 77), with room for ``num_placeholders`` tokens.

        The placeholders sit right after the start token (positions 1..num_placeholders) and are meant
        to be replaced by learnable embeddings in ``encode_text``; texts are cut so the end token stays
        inside CLIP's context window.
        """
        max_length = self.text_config.max_position_embeddings - num_placeholders
        encoded = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        ids = encoded["input_ids"]
        if num_placeholders:
            # Any id but the end token works: these embeddings are replaced before the transformer runs.
            filler = torch.zeros((ids.shape[0], num_placeholders), dtype=ids.dtype)
            ids = torch.cat([ids[:, :1], filler, ids[:, 1:]], dim=1)
        return ids.to(self.device)

    def encode_prompts(self, texts: list[str], tokens_per_chunk: int) -> torch.Tensor:
        """(len(texts), P) ``encode_text`` features of frozen prompts, each shared start computed once.

        Prompts are packed as prefix trees (``prefix_tree``; exact: under the causal mask a token depends only
        on the tokens before it) in rows of ``PROMPT_TREE_NODES`` nodes, every row padded to that size so that a
        new name meets the tensor shapes the kernels have already prepared, and the rows go through the text
        transformer ``tokens_per_chunk // PROMPT_TREE_NODES`` at a time.
        """
        max_length = self.text_config.max_position_embeddings  # under PROMPT_TREE_NODES: a prompt always fits a row
        sequences = self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        rows = pack_prefix_trees(sequences, PROMPT_TREE_NODES)
        rows_per_chunk = max(1, tokens_per_chunk // PROMPT_TREE_NODES)
        features = None
        for start in range(0, len(rows), rows_per_chunk):
            prompts, chunk_features = self._encode_prefix_trees(rows[start:start + rows_per_chunk])
            if features is None:
                features = chunk_features.new_empty((len(texts), chunk_features.shape[1]))
            features[prompts] = chunk_features
        return features

    def _encode_prefix_trees(self, rows: list[PrefixTreeRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt indices, their features) of one batch of packed rows, each padded to ``PROMPT_TREE_NODES``."""
        size = max(PROMPT_TREE_NODES, *(len(row) for row in rows))
        tokens = torch.zeros((len(rows), size), dtype=torch.long)
        positions = torch.zeros((len(rows), size), dtype=torch.long)
        allowed = torch.stack([row.ancestry(size) for row in rows])
        batch_rows, last_nodes, prompts = [], [], []
        for index, row in enumerate(rows):
            tokens[index, : len(row)] = torch.tensor(row.tokens)
            positions[index, : len(row)] = torch.tensor(row.depths())
            prompts += row.last_node.keys()
            last_nodes += row.last_node.values()
            batch_rows += [index] * len(row.last_node)
        text_model = self.model.text_model
        embeddings = text_model.embeddings
        hidden = (embeddings.token_embedding(tokens.to(self.device)) + embeddings.position_embedding(positions.to(self.device)))
        hidden = hidden.to(self.text_dtype)
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
        hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=mask[:, None].to(self.device)).last_hidden_state
        return torch.tensor(prompts, device=self.device), self._end_token_features(hidden[batch_rows, last_nodes])

    def _end_token_features(self, end_tokens: torch.Tensor) -> torch.Tensor:
        """Final norm, projection and L2 normalisation of end-token hidden states (N, D), in float32."""
        end_tokens = self.model.text_model.final_layer_norm(end_tokens.float())
        return F.normalize(self.model.text_projection(end_tokens), dim=-1)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        replacement: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected, L2-normalised end-token features (B, P).

        ``replacement`` (K, D) or (B, K, D) embeddings are written at token ``positions`` (K,) before the
        transformer runs; gradients reach them, never the frozen backbone.
        """
        text_model = self.model.text_model
        embeds = text_model.embeddings.token_embedding(input_ids)
        if replacement is not None:
            replacement = replacement.to(embeds.dtype).expand(input_ids.shape[0], -1, -1)
            embeds = embeds.index_copy(1, positions.to(input_ids.device), replacement)
        hidden = text_model.embeddings(inputs_embeds=embeds).to(self.text_dtype)
        # (config, inputs_embeds, attention_mask, cache) by position: transformers 5.24 renamed the fourth from
        # past_key_values to cache (the old keyword warns, and goes in 5.40), so keywords would pin one side.
        causal_mask = create_causal_mask(text_model.config, hidden, None, None)
        hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=causal_mask, is_causal=True).last_hidden_state
        # The first end token ends the prompt (the pad token may be the same id).
        end_positions = (input_ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)
        return self._end_token_features(hidden[torch.arange(hidden.shape[0], device=hidden.device), end_positions])
