"""The method registry: method names (CLI, Space, training command) <-> model classes <-> config classes.

```python
>>> from zsad.methods import METHODS, method_of, status
>>> METHODS["stackclip"]                      # StackCLIPModel
>>> method_of(model), status(model)            # "stackclip", "untrained"
```

Importing this module registers every method with ``AutoConfig`` / ``AutoModel``.
"""

from transformers import AutoConfig, AutoModel, PreTrainedConfig

from .errors import ZSADError
from .modeling.modeling_anomalyclip import AnomalyCLIPModel
from .modeling.modeling_genclip import GenCLIPModel
from .modeling.modeling_stackclip import StackCLIPModel
from .modeling.modeling_zeroshot_clip import ZeroShotCLIPModel
from .modeling.modeling_zsad_base import ZSADPreTrainedModel

METHODS: dict[str, type[ZSADPreTrainedModel]] = {
    "baseline": ZeroShotCLIPModel,
    "anomalyclip": AnomalyCLIPModel,
    "genclip": GenCLIPModel,
    "stackclip": StackCLIPModel,
}
_METHOD_OF_MODEL_TYPE = {model_class.config_class.model_type: name for name, model_class in METHODS.items()}

for _model_class in METHODS.values():
    AutoConfig.register(_model_class.config_class.model_type, _model_class.config_class, exist_ok=True)
    AutoModel.register(_model_class.config_class, _model_class, exist_ok=True)


def method_of_model_type(model_type: str) -> str:
    """The method name of a config's ``model_type`` (e.g. "stackclip" -> "stackclip", "zeroshot_clip" -> "baseline")."""
    if model_type not in _METHOD_OF_MODEL_TYPE:
        raise ZSADError(f"'{model_type}' is not a zsad model type; known: {sorted(_METHOD_OF_MODEL_TYPE)}.")
    return _METHOD_OF_MODEL_TYPE[model_type]


def method_of(model_or_config: ZSADPreTrainedModel | PreTrainedConfig) -> str:
    """The method name of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    return method_of_model_type(config.model_type)


def model_class(method_or_model_type: str) -> type[ZSADPreTrainedModel]:
    """The model class of a method name or a ``model_type``."""
    method = method_or_model_type if method_or_model_type in METHODS else method_of_model_type(method_or_model_type)
    return METHODS[method]


def config_class(method_or_model_type: str) -> type[PreTrainedConfig]:
    return model_class(method_or_model_type).config_class


def status(model_or_config: ZSADPreTrainedModel | PreTrainedConfig) -> str:
    """"trained", "untrained" (trainable parts at their training-free start) or "training-free" (nothing to train)."""
    config = getattr(model_or_config, "config", model_or_config)
    if not model_class(config.model_type).has_adapters:
        return "training-free"
    return "trained" if config.is_trained else "untrained"
