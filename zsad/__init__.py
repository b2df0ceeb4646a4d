"""zsad: zero-shot industrial anomaly detection with CLIP, on transformers.

```python
>>> import zsad
>>> model = zsad.ZeroShotCLIPModel.from_clip("openai/clip-vit-large-patch14-336")
>>> output = model(pixel_values, class_names=["bottle"])  # anomaly_map (B, S, S), image_score (B,)
```
"""

from transformers import AutoConfig, AutoModel

from .errors import ZSADError
from .modeling.clip_backbone import CLIPBackbone
from .modeling.configuration_zeroshot_clip import ZeroShotCLIPConfig
from .modeling.modeling_zeroshot_clip import ZeroShotCLIPModel
from .modeling.modeling_zsad_base import ZeroShotAnomalyOutput

__version__ = "0.1.0"

MODEL_CLASSES = {ZeroShotCLIPConfig: ZeroShotCLIPModel}

for _config_class, _model_class in MODEL_CLASSES.items():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)

__all__ = [
    "CLIPBackbone",
    "ZSADError",
    "ZeroShotAnomalyOutput",
    "ZeroShotCLIPConfig",
    "ZeroShotCLIPModel",
]
