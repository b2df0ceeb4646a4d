"""The exception types a user can cause; each message says what to do.

``ZSADError`` is defined in ``zsad/modeling/exceptions.py`` because the Hub's remote-code loader ships only
``zsad/modeling/`` with a checkpoint and the modeling code raises it too; users import it as ``zsad.ZSADError``.
"""

from ..modeling.exceptions import ZSADError


class BackboneLoadError(ZSADError):
    """The CLIP backbone could not be loaded (offline without a cached copy, or a wrong id or path)."""

    def __init__(self, clip: str, message: str):
        super().__init__(message)
        self.clip = clip


__all__ = ["BackboneLoadError"]
