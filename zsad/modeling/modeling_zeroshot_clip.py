"""The training-free CLIP baseline: prompt ensembles against CLIP's own projected patch tokens.

```python
>>> model = ZeroShotCLIPModel.from_clip("openai/clip-vit-large-patch14-336")
>>> output = model(pixel_values, class_names=["bottle"])
>>> output.anomaly_map.shape, output.image_score
```
"""

import torch
import torch.nn.functional as F

from .anomaly_maps import patch_state_probs, state_logits
from .clip_backbone import ImageFeatures
from .configuration_zeroshot_clip import ZeroShotCLIPConfig
from .modeling_zsad_base import ZeroShotAnomalyOutput, ZSADPreTrainedModel
from .prompting import class_names_for_batch, prompt_ensemble_features


class ZeroShotCLIPModel(ZSADPreTrainedModel):
    """Reference point for the trained methods: no trainable weights at all."""

    config_class = ZeroShotCLIPConfig
    has_adapters = False

    def __init__(self, config: ZeroShotCLIPConfig):
        super().__init__(config)
        self.post_init()

    def class_text_features(self, class_names: list[str]) -> torch.Tensor:
        """(B, 2, P) ensemble features, one pair per image, computed once per name on the backbone."""
        return prompt_ensemble_features(self.clip, class_names)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        class_names: str | list[str] | None = None,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
    ) -> ZeroShotAnomalyOutput:
        """``image_features`` (from ``backbone.encode_image``) replace ``pixel_values`` to share one vision pass."""
        backbone = self.require_backbone()
        features = self.encode_image(pixel_values, image_features)
        text = self.class_text_features(class_names_for_batch(class_names, features.batch_size))
        layer_probs = [
            patch_state_probs(
                F.normalize(backbone.project_patch_tokens(features.patch_tokens(i)), dim=-1), text, self.config.logit_scale
            )
            for i in range(len(features.layers))
        ]
        state_maps, layer_maps, anomaly_map = self.maps_from_layer_probs(layer_probs, features.grid_size, features.image_size)
        global_logits = state_logits(features.image_embeds, text, self.config.logit_scale)
        return self.build_output(state_maps, layer_maps, anomaly_map, global_logits, masks, labels)


ZeroShotCLIPModel.register_for_auto_class("AutoModel")
