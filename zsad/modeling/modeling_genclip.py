"""GenCLIP: general query prompts (GQP), multi-layer vision prompts (MVP), class name filtering (CNF) and
dual-branch inference (METHODS.md, "GenCLIP").

Prompts, written with the learnable token blocks in brackets:

- vision-enhanced branch, per image and tapped layer i: ``[N_p][Q_p + V_i] {name}.`` / ``[A_p][Q_p + V_i] {name}.``
  with V_i = MVP_i(mean of the layer-i hidden states) and ``name`` after CNF;
- query-only branch, image-independent: ``[N_p][Q_p] object.`` / ``[A_p][Q_p] object.``.

Map = b * M_vision + (1 - b) * M_query; image score = mean of the global probability and the map's maximum.

```python
>>> model = GenCLIPModel.from_clip("openai/clip-vit-large-patch14-336")  # untrained, training-free start
>>> output = model(pixel_values, class_names=["bottle"])
>>> output.anomaly_map, output.image_score, output.class_name_decision.names_used
```
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .anomaly_maps import patch_state_probs, state_logits
from .class_name_filter import (
    CNF_OFF,
    CNF_SOFT,
    ClassNameChoice,
    ClassNameDecision,
    candidate_logits,
    decide_class_names,
    name_probability_and_rank,
)
from .clip_backbone import ImageFeatures
from .configuration_genclip import GenCLIPConfig
from .exceptions import ZSADError
from .losses import image_loss
from .modeling_zsad_base import ZeroShotAnomalyOutput, ZSADPreTrainedModel
from .prompting import class_names_for_batch

ABNORMAL = 1


@dataclass
class GenCLIPImageDetails:
    """One image's branches: the fusion weight b, each branch's global abnormal probability, and the CNF decision."""

    branch_weight: float
    vision_global_score: float
    query_global_score: float
    class_name: ClassNameChoice


@dataclass
class GenCLIPOutput(ZeroShotAnomalyOutput):
    """``ZeroShotAnomalyOutput`` plus GenCLIP's two branches.

    Args:
        vision_map: (B, S, S) smoothed map of the vision-enhanced branch.
        query_map: (B, S, S) smoothed map of the query-only branch.
        vision_global_score: (B,) abnormal probability of the vision-enhanced branch's global text features.
        query_global_score: (B,) abnormal probability of the query-only branch's global text features.
        branch_weight: b of ``b * vision + (1 - b) * query``.
        class_name_decision: what class name filtering decided for each image.
    """

    vision_map: torch.Tensor | None = None
    query_map: torch.Tensor | None = None
    vision_global_score: torch.Tensor | None = None
    query_global_score: torch.Tensor | None = None
    branch_weight: float | None = None
    class_name_decision: ClassNameDecision | None = None

    def image_details(self, index: int) -> GenCLIPImageDetails:
        return GenCLIPImageDetails(self.branch_weight, float(self.vision_global_score[index]),
                                   float(self.query_global_score[index]), self.class_name_decision.for_image(index))


def tiled_token_ids(token_ids: list[int], length: int) -> list[int]:
    """Repeat ``token_ids`` until ``length`` ids are filled, cutting the last repeat ("a photo of a" -> 4 ids)."""
    repeats = -(-length // len(token_ids))
    return (token_ids * repeats)[:length]


class GenCLIPModel(ZSADPreTrainedModel):
    """GenCLIP heads on a frozen CLIP.

    Trainable: N_p, A_p, Q_p (word-embedding width), one MVP ``Linear(vision width -> text width)`` and one
    patch head ``Linear(vision width -> joint width)`` per tapped layer.
    """

    config_class = GenCLIPConfig

    def __init__(self, config: GenCLIPConfig):
        super().__init__(config)
        width, layers = config.text_hidden_size, len(config.feature_layers)
        self.normal_tokens = nn.Parameter(torch.zeros(config.num_state_tokens, width))
        self.abnormal_tokens = nn.Parameter(torch.zeros(config.num_state_tokens, width))
        self.query_tokens = nn.Parameter(torch.zeros(config.num_query_tokens, width))
        self.vision_prompts = nn.ModuleList(nn.Linear(config.vision_hidden_size, width) for _ in range(layers))
        self.patch_heads = nn.ModuleList(
            nn.Linear(config.vision_hidden_size, config.projection_dim) for _ in range(layers)
        )
        self.post_init()

    # ----- training-free start -----------------------------------------------------------------

    def init_from_backbone(self) -> None:
        """Prompt tokens from word embeddings of their init texts, MVPs at zero, patch heads = CLIP's projection."""
        with torch.no_grad():
            for tokens, text in (
                (self.normal_tokens, self.config.normal_prompt_init),
                (self.abnormal_tokens, self.config.abnormal_prompt_init),
                (self.query_tokens, self.config.query_prompt_init),
            ):
                tokens.copy_(self.word_embeddings_of(text, tokens.shape[0]))
            for linear in self.vision_prompts:
                linear.weight.zero_()
                linear.bias.zero_()
            projection = self.require_backbone().model.visual_projection.weight
            for head in self.patch_heads:
                head.weight.copy_(projection)
                head.bias.zero_()

    def word_embeddings_of(self, text: str, length: int) -> torch.Tensor:
        """(length, D) frozen word embeddings of ``text``'s tokens, tiled to ``length``."""
        backbone = self.require_backbone()
        token_ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not token_ids:
            raise ZSADError(f"The prompt init text {text!r} has no tokens; set a word such as 'flawless'.")
        ids = torch.tensor(tiled_token_ids(token_ids, length), device=backbone.device)
        return backbone.word_embeddings(ids).float()

    # ----- prompts -------------------------------------------------------------------------------

    @property
    def num_prompt_tokens(self) -> int:
        return self.config.num_state_tokens + self.config.num_query_tokens

    def vision_prompt_tokens(self, features: ImageFeatures) -> torch.Tensor:
        """MVP: (B, L, D_text) V_i = Linear_i(mean over all tokens of the raw layer-i hidden states)."""
        return torch.stack(
            [
                mvp(tokens.mean(dim=1).to(mvp.weight.dtype))
                for mvp, tokens in zip(self.vision_prompts, features.layer_tokens)
            ],
            dim=1,
        )

    def prompt_embeddings(self, vision_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Learnable prompt embeddings ``[N_p|A_p][Q_p (+ V_i)]``.

        Without ``vision_prompts``: (2, K, D), (normal, abnormal). With (B, L, D) MVP tokens: (B, L, 2, K, D),
        V of image b and layer l added to every Q_p token.
        """
        states = torch.stack([self.normal_tokens, self.abnormal_tokens])
        query = self.query_tokens
        if vision_prompts is None:
            return torch.cat([states, query.expand(2, -1, -1)], dim=1)
        batch, layers, _ = vision_prompts.shape
        query = query + vision_prompts[:, :, None, :]
        states = states.expand(batch, layers, -1, -1, -1)
        query = query[:, :, None].expand(-1, -1, 2, -1, -1)
        return torch.cat([states, query], dim=3)

    def encode_prompts(self, names: list[str], embeddings: torch.Tensor) -> torch.Tensor:
        """Text features (..., 2, P) of prompts whose learnable part is ``embeddings`` (..., 2, K, D) and
        whose class-name part is ``names[j]`` for the j-th entry of the leading dimension; one encoder call."""
        backbone = self.require_backbone()
        texts = [self.config.class_name_template.format(name) for name in names]
        ids = backbone.tokenize(texts, num_placeholders=self.num_prompt_tokens)
        prompts_per_name = embeddings[0].numel() // (embeddings.shape[-2] * embeddings.shape[-1])
        ids = ids.repeat_interleave(prompts_per_name, dim=0)
        replacement = embeddings.reshape(-1, *embeddings.shape[-2:])
        positions = torch.arange(1, self.num_prompt_tokens + 1)
        features = backbone.encode_text(ids, replacement=replacement, positions=positions)
        return features.reshape(*embeddings.shape[:-2], -1)

    def query_text_features(self) -> torch.Tensor:
        """(2, P) query-only branch ``[N_p/A_p][Q_p] object.``: image- and class-independent, so cached."""
        generic = self.config.generic_name
        return self.cached_text(
            ("query-only", generic), lambda: self.encode_prompts([generic], self.prompt_embeddings()[None])[0]
        )

    def vision_text_features(self, decision: ClassNameDecision, features: ImageFeatures) -> torch.Tensor:
        """(B, L, 2, P) vision-enhanced branch: one text pair per image and tapped layer, one encoder call.

        In CNF "soft" mode each pair is normalise(w * class-aware + (1 - w) * generic) with w the name's
        probability, both prompts carrying the same MVP tokens.
        """
        embeddings = self.prompt_embeddings(self.vision_prompt_tokens(features))
        if decision.mode != CNF_SOFT:
            return self.encode_prompts(decision.names_used, embeddings)
        batch = embeddings.shape[0]
        both = self.encode_prompts(
            decision.names_used + [self.config.generic_name] * batch, torch.cat([embeddings, embeddings])
        )
        weights = decision.class_weights.to(both.dtype).view(batch, 1, 1, 1)
        return F.normalize(weights * both[:batch] + (1.0 - weights) * both[batch:], dim=-1)

    # ----- class name filtering -----------------------------------------------------------------

    def filter_class_names(self, names: list[str], image_embeds: torch.Tensor) -> ClassNameDecision:
        """CNF with the frozen CLIP only; training uses the given names (the paper trains without CNF)."""
        config = self.config
        if config.cnf_mode == CNF_OFF or self.training:
            return decide_class_names(None, None, names, CNF_OFF, config.cnf_threshold, config.cnf_top_k, config.generic_name)
        probabilities, ranks = self.class_name_probability_and_rank(names, image_embeds)
        return decide_class_names(probabilities, ranks, names, config.cnf_mode, config.cnf_threshold,
                                  config.cnf_top_k, config.generic_name)

    def class_name_probability_and_rank(self, names: list[str], image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) zero-shot probability of each image's name among the generic candidates, and its 1-based rank."""
        config = self.config
        generic_features = self.cnf_generic_features()
        name_features = self.cnf_name_features(names)
        candidates = list(config.cnf_generic_nouns) + [config.generic_name]
        duplicate = torch.tensor([[name == noun for noun in candidates] for name in names], device=image_embeds.device)
        logit_scale = self.require_backbone().model.logit_scale.exp().item()
        logits = candidate_logits(image_embeds, name_features.to(image_embeds.dtype),
                                  generic_features.to(image_embeds.dtype), duplicate, logit_scale)
        return name_probability_and_rank(logits)

    def cnf_generic_features(self) -> torch.Tensor:
        """(G + 1, P) features of the generic nouns' prompts and of ``cnf_generic_prompt``."""
        config = self.config
        prompts = [config.cnf_template.format(noun) for noun in config.cnf_generic_nouns] + [config.cnf_generic_prompt]
        return self.frozen_text_features(prompts)

    def cnf_name_features(self, names: list[str]) -> torch.Tensor:
        """(B, P) features of ``cnf_template`` with each image's name, cached per name (batches mix names)."""
        per_name = {name: self.frozen_text_features([self.config.cnf_template.format(name)])[0] for name in set(names)}
        return torch.stack([per_name[name] for name in names])

    def frozen_text_features(self, prompts: list[str]) -> torch.Tensor:
        """Plain frozen-CLIP text features (no learned tokens), computed once per backbone (also through training)."""
        backbone = self.require_backbone()
        return backbone.frozen_features(("prompts", tuple(prompts)), lambda: backbone.encode_text(backbone.tokenize(prompts)))

    # ----- forward --------------------------------------------------------------------------------

    def patch_features(self, features: ImageFeatures, index: int) -> torch.Tensor:
        """(B, N, P) L2-normalised patch features of tapped layer ``index``: frozen post_layernorm, then its head."""
        backbone = self.require_backbone()
        tokens = backbone.post_layernorm(features.patch_tokens(index))
        return F.normalize(backbone.project_patches(self.patch_heads[index], tokens), dim=-1)

    def global_state_probs(self, image_embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 2) state probabilities of the global image feature; (B, L, 2, P) text is averaged over layers."""
        embeds = image_embeds.to(text.dtype)
        if text.dim() == 4:
            return torch.stack(
                [state_logits(embeds, text[:, i], self.config.logit_scale).softmax(dim=-1) for i in range(text.shape[1])]
            ).mean(dim=0)
        return state_logits(embeds, text, self.config.logit_scale).softmax(dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        class_names: str | list[str] | None = None,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
    ) -> GenCLIPOutput:
        """``image_features`` (from ``backbone.encode_image``) replace ``pixel_values`` to share one vision pass."""
        features = self.encode_image(pixel_values, image_features)
        names = class_names_for_batch(class_names, features.batch_size)
        decision = self.filter_class_names(names, features.image_embeds)
        vision_text = self.vision_text_features(decision, features)
        query_text = self.query_text_features()
        patches = [self.patch_features(features, i) for i in range(len(features.layers))]
        scale, size = self.config.logit_scale, features.image_size
        vision_state, vision_layers, vision_map = self.maps_from_layer_probs(
            [patch_state_probs(p, vision_text[:, i], scale) for i, p in enumerate(patches)], features.grid_size, size
        )
        query_state, query_layers, query_map = self.maps_from_layer_probs(
            [patch_state_probs(p, query_text, scale) for p in patches], features.grid_size, size
        )
        b = self.config.branch_weight
        vision_global = self.global_state_probs(features.image_embeds, vision_text)
        query_global = self.global_state_probs(features.image_embeds, query_text)
        global_probs = b * vision_global + (1.0 - b) * query_global
        loss_maps = vision_state + (query_state if self.config.train_query_branch else [])
        # log of the fused probabilities: softmax gives them back, cross-entropy is their NLL.
        global_logits = global_probs.clamp_min(torch.finfo(global_probs.dtype).tiny).log()
        output = self.build_output(
            loss_maps,
            b * vision_layers + (1.0 - b) * query_layers,
            b * vision_map + (1.0 - b) * query_map,
            global_logits,
            masks,
            output_class=GenCLIPOutput,
            vision_map=vision_map,
            query_map=query_map,
            vision_global_score=vision_global[:, ABNORMAL],
            query_global_score=query_global[:, ABNORMAL],
            branch_weight=b,
            class_name_decision=decision,
        )
        if labels is None or self.config.image_loss_weight == 0:
            return output
        trained_probs = vision_global if self.config.image_loss_branch == "vision" else global_probs
        trained_logits = trained_probs.clamp_min(torch.finfo(trained_probs.dtype).tiny).log()
        weighted = self.config.image_loss_weight * image_loss(trained_logits, labels)
        return replace(output, loss=weighted if output.loss is None else output.loss + weighted)


GenCLIPModel.register_for_auto_class("AutoModel")
