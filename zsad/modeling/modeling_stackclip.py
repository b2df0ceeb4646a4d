"""StackCLIP: Clustering-driven Stacked Prompts (CSP), Ensemble Feature Alignment (EFA) and Regulating
Prompt Learning (RPL), as specified in METHODS.md.

```python
>>> model = StackCLIPModel.from_clip("openai/clip-vit-large-patch14-336")   # training-free start
>>> model.prepare_for_training(["bottle", "cable", "screw"])                # CSP: clusters, stacked prompts
>>> output = model(pixel_values, class_names=["pcb1"])                      # unseen category
>>> output.anomaly_map, output.image_score, output.cluster_weights
```
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .anomaly_maps import patch_state_probs, state_logits
from .clip_backbone import ImageFeatures
from .configuration_stackclip import EFA_ALL_DATA, StackCLIPConfig
from .exceptions import ZSADError
from .losses import image_loss, segmentation_loss
from .modeling_zsad_base import ZeroShotAnomalyOutput, ZSADPreTrainedModel
from .prompting import class_names_for_batch, clean_class_name, prompt_ensemble_features
from .stacking import class_prompt_features, cluster_categories, cluster_weights, fuse_text_features, stacked_name

logger = logging.get_logger(__name__)


@dataclass
class StackCLIPImageDetails:
    """One image's EFA mixing: the weight of each cluster's heads and each cluster's stacked name."""

    cluster_weights: list[float]
    stacked_names: list[str]


@dataclass
class StackCLIPOutput(ZeroShotAnomalyOutput):
    """``ZeroShotAnomalyOutput`` plus StackCLIP's parts.

    Args:
        cluster_weights: (B, K) EFA weights of the K clusters' heads for each image (K = 1 before CSP).
        stacked_names: the K clusters' stacked names (None before CSP).
        rpl_regularizer: the RPL regulariser, when ``labels`` are given.
    """

    cluster_weights: torch.Tensor | None = None
    stacked_names: list[str] | None = None
    rpl_regularizer: torch.Tensor | None = None

    def image_details(self, index: int) -> StackCLIPImageDetails:
        return StackCLIPImageDetails(self.cluster_weights[index].float().tolist(), list(self.stacked_names or []))


class StackCLIPModel(ZSADPreTrainedModel):
    """Frozen CLIP + per-cluster, per-layer EFA heads + learnable RPL context.

    The CSP result (cluster members, centroids, stacked prompt features) is in the config and the
    checkpoint, so a loaded model needs no training data.
    """

    config_class = StackCLIPConfig

    def __init__(self, config: StackCLIPConfig):
        super().__init__(config)
        self.efa_heads = self._new_efa_heads(config.num_head_sets)
        # (state, context token, text width): separate contexts for "object" and "damaged object".
        self.rpl_context = nn.Parameter(torch.zeros(2, config.n_ctx, config.text_hidden_size))
        num_clusters = len(config.cluster_members or [])
        self.register_buffer("cluster_centroids", torch.zeros(num_clusters, config.projection_dim))
        self.register_buffer("stacked_text", torch.zeros(num_clusters, 2, config.projection_dim))
        self.post_init()

    def _new_efa_heads(self, num_head_sets: int) -> nn.ModuleList:
        """One ``Linear(vision width -> joint space)`` per cluster and tapped layer."""
        config = self.config
        return nn.ModuleList(
            nn.ModuleList(nn.Linear(config.vision_hidden_size, config.projection_dim) for _ in config.feature_layers)
            for _ in range(num_head_sets)
        )

    # ----- training-free start and CSP -------------------------------------------------------

    def init_from_backbone(self) -> None:
        """EFA heads = CLIP's visual_projection (bias 0); RPL context = word embeddings of ``ctx_init``."""
        backbone = self.require_backbone()
        projection = backbone.model.visual_projection.weight
        with torch.no_grad():
            for heads in self.efa_heads:
                for head in heads:
                    head.weight.copy_(projection)
                    head.bias.zero_()
            self.rpl_context.copy_(self._initial_context().unsqueeze(0).expand_as(self.rpl_context))

    def _initial_context(self) -> torch.Tensor:
        """(n_ctx, D) embeddings of ``ctx_init`` tokens, repeated so the phrase ends next to the state words."""
        backbone = self.require_backbone()
        ids = backbone.tokenizer(self.config.ctx_init, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if ids.numel() == 0:
            raise ZSADError("ctx_init must contain at least one word, e.g. 'a photo of a'.")
        repeats = -(-self.config.n_ctx // ids.numel())
        ids = ids.repeat(repeats)[-self.config.n_ctx:]
        return backbone.word_embeddings(ids.to(backbone.device)).float()

    def prepare_for_training(self, class_names: list[str]) -> None:
        """CSP on the training categories: cluster, stack names, encode stacked prompts, one head set per cluster.

        Calling it again with the same categories keeps the model as it is (resuming training).
        """
        names = sorted({clean_class_name(name) for name in class_names})
        if not names:
            raise ZSADError("StackCLIP needs at least one training category name to build its clusters.")
        known = sorted(name for members in self.config.cluster_members or [] for name in members)
        if known == names:
            return
        if self.config.is_trained:
            raise ZSADError(
                f"This StackCLIP model was trained on the clusters {self.config.cluster_members}; training it on "
                f"other categories {names} would discard its heads. Start from an untrained model (from_clip)."
            )
        backbone = self.require_backbone()
        config = self.config
        with torch.no_grad():
            features = class_prompt_features(backbone, names)
            clustering = cluster_categories(
                features.cpu().numpy(), names, config.num_clusters, config.max_clusters,
                config.cluster_penalty, config.kmeans_n_init, config.cluster_seed, config.cluster_spread,
            )
            stacked_names = [stacked_name(members, backbone.tokenizer, backbone.text_config.max_position_embeddings)
                             for members in clustering.members]
            stacked_text = prompt_ensemble_features(backbone, stacked_names).float()
        config.cluster_members = clustering.members
        config.cluster_count_scores = {str(count): score for count, score in clustering.count_scores.items()}
        config.stacked_names = stacked_names
        logger.info(f"StackCLIP stacked prompts: {stacked_names}")
        device = backbone.device
        self.cluster_centroids = torch.as_tensor(clustering.centroids, dtype=torch.float32, device=device)
        self.stacked_text = stacked_text.to(device)
        self.efa_heads = self._new_efa_heads(config.num_head_sets).to(device)
        self.init_from_backbone()
        self._text_cache.clear()

    # ----- text features ----------------------------------------------------------------------

    def precise_text(self, names: list[str]) -> torch.Tensor:
        """(B, 2, P) state x template ensemble with each image's own category name."""
        return prompt_ensemble_features(self.clip, names).float()

    def class_features(self, names: list[str]) -> torch.Tensor:
        """(B, P) precise class features t_c (no state words), as used for clustering."""
        return class_prompt_features(self.clip, names)

    def fused_text(self, names: list[str]) -> torch.Tensor:
        """(B, K, 2, P) text pair of each image's category for each cluster; (B, 1, 2, P) precise before CSP."""
        precise = self.precise_text(names)
        if not self.config.cluster_members:
            return precise.unsqueeze(1)
        return fuse_text_features(self.stacked_text, precise, self.config.fusion_weight)

    def stacked_targets(self, weights: torch.Tensor, names: list[str]) -> torch.Tensor:
        """(B, 2, P) stacked features the RPL prompts are pulled towards: each image's clusters by weight."""
        if not self.config.cluster_members:
            return self.precise_text(names)
        return F.normalize(torch.einsum("bk,ksp->bsp", weights, self.stacked_text), dim=-1)

    def rpl_text(self) -> torch.Tensor:
        """(2, P) learned (normal, abnormal) features of ``[ctx] object.`` / ``[ctx] damaged object.``."""

        def compute():
            backbone = self.require_backbone()
            n_ctx = self.config.n_ctx
            texts = [f"{self.config.rpl_normal_text}.", f"{self.config.rpl_abnormal_text}."]
            ids = backbone.tokenize(texts, num_placeholders=n_ctx)
            positions = torch.arange(1, n_ctx + 1, device=ids.device)
            return backbone.encode_text(ids, self.rpl_context, positions).float()

        return self.cached_text(("rpl",), compute)

    # ----- EFA --------------------------------------------------------------------------------

    def ensemble_weights(self, names: list[str]) -> torch.Tensor:
        """(B, K) EFA weights. In training, a training category uses only its own cluster (one-hot)."""
        members = self.config.cluster_members
        if not members:
            return torch.ones(len(names), 1, device=self.rpl_context.device)
        weights = cluster_weights(self.class_features(names), self.cluster_centroids, self.config.cluster_temperature)
        if self.training:
            own = {name: index for index, names_of in enumerate(members) for name in names_of}
            for row, name in enumerate(names):
                if name in own:
                    weights[row] = F.one_hot(torch.tensor(own[name]), len(members)).to(weights)
        return weights

    def cluster_layer_probs(self, features, text: torch.Tensor) -> list[list[torch.Tensor]]:
        """[cluster][layer] (B, 2, N) state probabilities from that cluster's heads and text pairs."""
        normed_tokens = [self.clip.post_layernorm(features.patch_tokens(i)) for i in range(len(features.layers))]
        return [
            [
                patch_state_probs(
                    F.normalize(self.clip.project_patches(head, tokens), dim=-1), text[:, cluster], self.config.logit_scale
                )
                for head, tokens in zip(heads, normed_tokens)
            ]
            for cluster, heads in enumerate(self.efa_heads)
        ]

    @staticmethod
    def ensemble(cluster_probs: list[list[torch.Tensor]], weights: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, sum_i w_i * probs_i (the ensemble of maps, done before the linear upsampling)."""
        return [
            sum(weights[:, cluster, None, None] * layers[layer] for cluster, layers in enumerate(cluster_probs))
            for layer in range(len(cluster_probs[0]))
        ]

    def segmentation_loss(self, cluster_probs, weights, masks, grid_size: int, image_size: int) -> torch.Tensor:
        """Focal + Dice summed over layers; "all-data" averages it over every cluster's own maps."""
        if self.config.efa_training == EFA_ALL_DATA and self.training:
            eye = torch.eye(weights.shape[1], device=weights.device)
            routings = [eye[cluster].expand_as(weights) for cluster in range(weights.shape[1])]
        else:
            routings = [weights]
        losses = []
        for routing in routings:
            state_maps, _, _ = self.maps_from_layer_probs(self.ensemble(cluster_probs, routing), grid_size, image_size)
            losses.append(sum(segmentation_loss(maps, masks) for maps in state_maps))
        return torch.stack(losses).mean()

    # ----- forward ----------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        class_names: str | list[str] | None = None,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
    ) -> StackCLIPOutput:
        """``image_features`` (from ``backbone.encode_image``) replace ``pixel_values`` to share one vision pass."""
        features = self.encode_image(pixel_values, image_features)
        names = class_names_for_batch(class_names, features.batch_size)
        image_size = features.image_size
        weights = self.ensemble_weights(names)
        cluster_probs = self.cluster_layer_probs(features, self.fused_text(names))
        state_maps, layer_maps, anomaly_map = self.maps_from_layer_probs(
            self.ensemble(cluster_probs, weights), features.grid_size, image_size
        )
        learned = self.rpl_text()
        global_logits = state_logits(features.image_embeds.float(), learned, self.config.logit_scale)
        output = self.build_output(state_maps, layer_maps, anomaly_map, global_logits, output_class=StackCLIPOutput,
                                   cluster_weights=weights, stacked_names=self.config.stacked_names)
        if masks is None and labels is None:
            return output
        loss, regularizer = 0.0, None
        if masks is not None:
            loss = self.segmentation_loss(cluster_probs, weights, masks, features.grid_size, image_size)
        if labels is not None:
            regularizer = self.rpl_regularizer(learned, self.stacked_targets(weights, names))
            loss = loss + image_loss(global_logits, labels) + self.config.rpl_regularizer_weight * regularizer
        return replace(output, loss=loss, rpl_regularizer=None if regularizer is None else regularizer.detach())

    @staticmethod
    def rpl_regularizer(learned: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """sum over states of (1 - cos(learned[s], stacked[s])), averaged over images."""
        return (1.0 - torch.einsum("sp,bsp->bs", learned, targets.to(learned.dtype))).sum(dim=1).mean()


StackCLIPModel.register_for_auto_class("AutoModel")
