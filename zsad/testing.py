"""Offline testing support: ``save_tiny_clip(directory)`` writes a tiny random CLIP (model + tokenizer + image
processor). It lives in ``zsad.runtime.tiny_clip``; this name is the documented contract other tools use."""

from .runtime.tiny_clip import save_tiny_clip

__all__ = ["save_tiny_clip"]
