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
from .modeling.configuration_genclip import GenCLIPConfig
from .modeling.configuration_stackclip import StackCLIPConfig
from .modeling.configuration_zeroshot_clip import ZeroShotCLIPConfig
from .modeling.modeling_genclip import GenCLIPModel
from .modeling.modeling_stackclip import StackCLIPModel
from .modeling.modeling_zeroshot_clip import ZeroShotCLIPModel
from .modeling.modeling_zsad_base import ZeroShotAnomalyOutput

__version__ = "0.1.0"

# Method name (CLI, Space, training command) -> model class.
METHODS = {
    "baseline": ZeroShotCLIPModel,
    "genclip": GenCLIPModel,
    "stackclip": StackCLIPModel,
}

for _model_class in METHODS.values():
    AutoConfig.register(_model_class.config_class.model_type, _model_class.config_class, exist_ok=True)
    AutoModel.register(_model_class.config_class, _model_class, exist_ok=True)

from .loading import load_backbone, load_model  # noqa: E402  (needs METHODS)

__all__ = [
    "METHODS",
    "CLIPBackbone",
    "GenCLIPConfig",
    "GenCLIPModel",
    "StackCLIPConfig",
    "StackCLIPModel",
    "ZSADError",
    "ZeroShotAnomalyOutput",
    "ZeroShotCLIPConfig",
    "ZeroShotCLIPModel",
    "load_backbone",
    "load_model",
]
