"""AnomalyCLIP (Zhou et al., ICLR 2024), as its authors' ``test.py`` computes it (docs/METHODS.md, "AnomalyCLIP").

Object-agnostic prompts: learned context vectors before "object." and "damaged object." (no class name, so
``class_names`` is accepted and not used), deep prompt tokens at the deeper text blocks, patch tokens of the
value-value stream (their DPAM), and the image score from the last block's class token as they take it (projected
without CLIP's final LayerNorm).

```python
>>> model = AnomalyCLIPModel.from_pretrained("converted-anomalyclip/")   # zsad convert anomalyclip epoch_15.pth
>>> output = model(pixel_values)                                           # class_names optional
>>> output.anomaly_map, output.image_score
```
"""

import torch
import torch.nn.functional as F
from torch import nn

from .anomaly_maps import gaussian_blur_reflect, patch_state_probs, scaled_sigma, state_logits, upsample_patch_maps
from .clip_backbone import ImageFeatures
from .configuration_anomalyclip import AnomalyCLIPConfig
from .deep_text_prompts import encode_with_deep_prompts
from .exceptions import ZSADError
from .losses import image_loss, segmentation_loss
from .modeling_zsad_base import ZeroShotAnomalyOutput, ZSADPreTrainedModel


class AnomalyCLIPModel(ZSADPreTrainedModel):
    """Frozen CLIP + learned prompt context (2 states x n_ctx tokens) + deep prompt tokens (depth - 1 sets)."""

    config_class = AnomalyCLIPConfig
    works_untrained = False
    # The authors' train.py / train.sh: 15 epochs, batch 8, Adam lr 1e-3 betas (0.5, 0.999); 518 px and the last
    # layer are the config's defaults, the loss (focal + two Dice terms per map, times 4, plus the image
    # cross-entropy) is this forward's.
    training_recipe = {"epochs": 15, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999)}

    def __init__(self, config: AnomalyCLIPConfig):
        super().__init__(config)
        # (state, token, text width): state 0 precedes normal_text, state 1 abnormal_text.
        self.prompt_context = nn.Parameter(torch.zeros(2, config.n_ctx, config.text_hidden_size))
        self.deep_prompts = nn.Parameter(torch.zeros(config.deep_prompt_depth - 1, config.deep_prompt_length,
                                                     config.text_hidden_size))
        self.post_init()

    def init_from_backbone(self) -> None:
        """Context = word embeddings of ``context_init`` (repeated); deep prompts drawn as the authors draw them."""
        backbone = self.require_backbone()
        config = self.config
        ids = backbone.tokenizer(config.context_init, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if ids.numel() == 0:
            raise ZSADError("context_init must contain at least one word, e.g. 'a photo of a'.")
        ids = ids.repeat(-(-config.n_ctx // ids.numel()))[-config.n_ctx:]
        generator = torch.Generator().manual_seed(config.init_seed)
        with torch.no_grad():
            self.prompt_context.copy_(backbone.word_embeddings(ids.to(backbone.device)).float().expand_as(self.prompt_context))
            self.deep_prompts.copy_(torch.randn(self.deep_prompts.shape, generator=generator) * config.deep_prompt_init_std)

    # ----- text -------------------------------------------------------------------------------

    def prompt_token_ids(self) -> torch.Tensor:
        """(2, T) ids of "<start> [n_ctx placeholders] normal_text <end>" and the abnormal one."""
        backbone = self.require_backbone()
        return backbone.tokenize([self.config.normal_text, self.config.abnormal_text], num_placeholders=self.config.n_ctx)

    def text_features(self) -> torch.Tensor:
        """(2, P) normalised (normal, abnormal) features, cached until a parameter changes."""

        def compute():
            return encode_with_deep_prompts(self.require_backbone(), self.prompt_token_ids(), self.prompt_context,
                                            self.deep_prompts, self.config.deep_prompt_float16).float()

        return self.cached_text(("anomalyclip",), compute)

    # ----- vision -----------------------------------------------------------------------------

    def global_embeddings(self, features: ImageFeatures) -> torch.Tensor:
        """(B, P) normalised projection of the raw class token (no final LayerNorm), as the authors score images."""
        projection = self.require_backbone().model.visual_projection
        return F.normalize(projection(features.class_token.float().to(projection.weight.dtype)).float(), dim=-1)

    # ----- forward ----------------------------------------------------------------------------

    def combine_layer_maps(self, layer_maps: torch.Tensor, image_size: int) -> torch.Tensor:
        """Per-layer (B, L, S, S) abnormal maps -> one map, smoothed as scipy's gaussian_filter does."""
        combined = layer_maps.sum(dim=1) if self.config.layer_combination == "sum" else layer_maps.mean(dim=1)
        sigma = scaled_sigma(self.config.smoothing_sigma, image_size, self.config.smoothing_reference_size)
        return gaussian_blur_reflect(combined, sigma)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        class_names: str | list[str] | None = None,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features=None,
    ) -> ZeroShotAnomalyOutput:
        """``class_names`` is accepted for a common interface and not used (the prompts name no class).
        ``image_features`` as every method takes them (one vision pass shared with other models)."""
        features = self.encode_image(pixel_values, image_features)
        backbone = self.require_backbone()
        text = self.text_features()
        logit_scale = self.config.logit_scale
        state_maps = []
        for index in range(len(features.layers)):
            patches = F.normalize(backbone.project_patch_tokens(features.patch_tokens(index)), dim=-1)
            state_maps.append(upsample_patch_maps(patch_state_probs(patches, text, logit_scale), features.grid_size,
                                                  features.image_size))
        # The authors' (abnormal + 1 - normal) / 2: the abnormal probability up to rounding.
        layer_maps = torch.stack([(maps[:, 1] + 1.0 - maps[:, 0]) / 2.0 for maps in state_maps], dim=1)
        anomaly_map = self.combine_layer_maps(layer_maps, features.image_size)
        global_logits = state_logits(self.global_embeddings(features), text, logit_scale)
        output = self.build_output(state_maps, layer_maps, anomaly_map, global_logits)
        if masks is None and labels is None:
            return output
        loss = 0.0
        if masks is not None:
            loss = self.config.map_loss_weight * sum(segmentation_loss(maps, masks) for maps in state_maps)
        if labels is not None:
            loss = loss + image_loss(global_logits, labels)
        output.loss = loss
        return output


AnomalyCLIPModel.register_for_auto_class("AutoModel")
