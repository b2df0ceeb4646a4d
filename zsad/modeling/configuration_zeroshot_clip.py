"""Configuration of the training-free CLIP baseline."""

from .configuration_zsad_base import ZSADBaseConfig


class ZeroShotCLIPConfig(ZSADBaseConfig):
    """The prompt-ensemble baseline has no settings beyond the shared ones."""

    model_type = "zeroshot_clip"


ZeroShotCLIPConfig.register_for_auto_class()
