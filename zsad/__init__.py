"""zsad: zero-shot industrial anomaly detection with CLIP, on transformers.

```python
>>> import zsad
>>> model = zsad.ZeroShotCLIPModel.from_clip("openai/clip-vit-large-patch14-336")
>>> output = model(pixel_values, class_names=["bottle"])  # anomaly_map (B, S, S), image_score (B,)
```

The names below load on first use (PEP 562): ``zsad.deploy`` runs exported graphs in processes without torch,
and importing the package must not import torch and transformers there.
"""

__version__ = "0.1.0"

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


def _public_names() -> dict:
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

    # Method name (CLI, Space, training command) -> model class.
    METHODS = {
        "baseline": ZeroShotCLIPModel,
        "genclip": GenCLIPModel,
        "stackclip": StackCLIPModel,
    }
    for model_class in METHODS.values():
        AutoConfig.register(model_class.config_class.model_type, model_class.config_class, exist_ok=True)
        AutoModel.register(model_class.config_class, model_class, exist_ok=True)
    globals()["METHODS"] = METHODS  # loading.py's `from . import METHODS` must find it while it is imported

    from .loading import load_backbone, load_model

    names = locals()
    return {name: names[name] for name in __all__}


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'zsad' has no attribute '{name}'")
    globals().update(_public_names())
    return globals()[name]
