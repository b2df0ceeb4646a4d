"""Offline testing support: ``save_tiny_clip(directory)`` writes a tiny random CLIP (model + tokenizer + image
processor). It lives in ``zsad.tiny_clip``; this name is the documented contract other tools use."""

from .tiny_clip import save_tiny_clip

__all__ = ["save_tiny_clip"]
