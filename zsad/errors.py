"""The exception type for every error a user can cause; its message says what to do."""

from .modeling.exceptions import ZSADError

__all__ = ["ZSADError"]
