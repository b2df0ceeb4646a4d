"""zsad: zero-shot industrial anomaly detection with CLIP, on transformers.

```python
>>> import zsad
>>> model = zsad.ZeroShotCLIPModel.from_clip("openai/clip-vit-large-patch14-336")
>>> output = model(pixel_values, class_names=["bottle"])  # anomaly_map (B, S, S), image_score (B,)
```
"""

from .errors import ZSADError
from .loading import load_backbone, load_model
from .methods import METHODS
from .modeling.clip_backbone import CLIPBackbone
from .modeling.configuration_genclip import GenCLIPConfig
from .modeling.configuration_stackclip import StackCLIPConfig
from .modeling.configuration_zeroshot_clip import ZeroShotCLIPConfig
from .modeling.modeling_genclip import GenCLIPModel, GenCLIPOutput
from .modeling.modeling_stackclip import StackCLIPModel, StackCLIPOutput
from .modeling.modeling_zeroshot_clip import ZeroShotCLIPModel
from .modeling.modeling_zsad_base import ZeroShotAnomalyOutput
from .profile import ProductProfile

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CLIPBackbone",
    "GenCLIPConfig",
    "GenCLIPModel",
    "GenCLIPOutput",
    "ProductProfile",
    "StackCLIPConfig",
    "StackCLIPModel",
    "StackCLIPOutput",
    "ZSADError",
    "ZeroShotAnomalyOutput",
    "ZeroShotCLIPConfig",
    "ZeroShotCLIPModel",
    "load_backbone",
    "load_model",
]
