"""Code that travels to the Hub with every checkpoint (``trust_remote_code=True``).

Files here import each other only as ``from .sibling import name``; see docs/ARCHITECTURE.md.
"""
