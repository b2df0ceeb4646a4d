"""zsad: zero-shot industrial anomaly detection with CLIP, on transformers.

```python
>>> import zsad
>>> model = zsad.ZeroShotCLIPModel.from_clip("openai/clip-vit-large-patch14-336")
>>> output = model(pixel_values, class_names=["bottle"])  # anomaly_map (B, S, S), image_score (B,)
```

Importing zsad registers its configs and models with ``AutoConfig`` / ``AutoModel`` (through ``zsad.methods``),
which imports torch and transformers; the ``zsad`` command therefore parses its arguments in ``zsad_cli`` first.
On a machine without PyTorch (a deployment running exported graphs with ``zsad.deploy``) only the torch-free
modules load: ``zsad.deploy``, ``zsad.detection``, ``zsad.predict``, ``zsad.images`` and ``zsad.errors``.
"""

from .errors import ZSADError

__version__ = "0.1.0"

try:
    import torch  # noqa: F401
except ImportError:  # a torch-free deployment: the models and everything built on them are not available
    pass
else:
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

__all__ = [
    "METHODS",
    "CLIPBackbone",
    "GenCLIPConfig",
    "GenCLIPModel",
    "GenCLIPOutput",
    "ProductProfile",
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
