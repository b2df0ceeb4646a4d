"""zsad: zero-shot industrial anomaly detection with CLIP, on transformers.

```python
>>> import zsad
>>> model = zsad.ZeroShotCLIPModel.from_clip("openai/clip-vit-large-patch14-336")
>>> output = model(pixel_values, class_names=["bottle"])  # anomaly_map (B, S, S), image_score (B,)
```

Importing zsad registers its configs and models with ``AutoConfig`` / ``AutoModel`` (through ``zsad.runtime.methods``),
which imports torch and transformers; the ``zsad`` command therefore parses its arguments in ``zsad_cli`` first.
On a machine without PyTorch (a deployment running exported graphs with ``zsad.deploy.runtime``) only the torch-free
modules load: ``zsad.deploy.runtime``, ``zsad.detection.results``, ``zsad.cli.predict``, ``zsad.runtime.images`` and ``zsad.runtime.errors``.
"""

from .modeling.exceptions import ZSADError

__version__ = "0.1.0"

try:
    import torch  # noqa: F401
except ImportError:  # a torch-free deployment: the models and everything built on them are not available
    pass
else:
    from .detection.detector import AnomalyDetector
    from .detection.profile import ProductProfile
    from .modeling.clip_backbone import CLIPBackbone
    from .modeling.configuration_genclip import GenCLIPConfig
    from .modeling.configuration_stackclip import StackCLIPConfig
    from .modeling.configuration_zeroshot_clip import ZeroShotCLIPConfig
    from .modeling.modeling_genclip import GenCLIPModel, GenCLIPOutput
    from .modeling.modeling_stackclip import StackCLIPModel, StackCLIPOutput
    from .modeling.modeling_zeroshot_clip import ZeroShotCLIPModel
    from .modeling.modeling_zsad_base import ZeroShotAnomalyOutput
    from .runtime.loading import load_backbone, load_model
    from .runtime.methods import METHODS

__all__ = [
    "METHODS",
    "AnomalyDetector",
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
