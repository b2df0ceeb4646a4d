"""What every layer above the models stands on: the user-facing errors (``errors``), reading images (``images``),
loading a method or checkpoint on a device and precision (``loading``), the method registry (``methods``),
provenance of results (``provenance``), files and folders written atomically (``atomic``), what runs the vision pass
(``engine``: torch or a cached OpenVINO graph; ``engine_choice``: the faster one here, measured), the tiny random
CLIP for tests (``tiny_clip``), freeing allocator memory (``allocator``) and Accelerate process groups (``distributed``).

``errors`` and ``images`` import without torch; the others need it.
"""
