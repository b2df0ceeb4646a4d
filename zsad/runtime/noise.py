"""Output the user cannot act on kept out: progress bars only on a terminal, third-party log lines zsad triggers
silenced for the call that triggers them, and (for the ``zsad`` command, which owns its process) the libraries'
own progress bars off."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager


def bar_disable(shown: bool) -> bool | None:
    """tqdm's ``disable`` for a bar of zsad's: None lets tqdm show it only on a terminal (a log gets no carriage
    returns, nor the cursor-up escapes of nested bars); tqdm's notebook bars read None as shown."""
    return None if shown else True


@contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """The logger ``name`` at ``level`` for the block, its own level restored after."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def quiet_library_progress() -> None:
    """The libraries' progress bars off for the process: huggingface_hub's (downloads, "Writing model shards") and
    transformers' ("Loading weights")."""
    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()
    try:
        import transformers.utils.logging
    except ImportError:  # a deployment without transformers runs exported graphs only (zsad predict --engine onnx)
        return
    transformers.utils.logging.disable_progress_bar()
