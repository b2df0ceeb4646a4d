"""Clean ends for runs on several processes (``accelerate launch``)."""

from collections.abc import Iterator
from contextlib import contextmanager

from accelerate import Accelerator


@contextmanager
def process_group_closed_at_end(accelerator: Accelerator) -> Iterator[Accelerator]:
    """Run the block, wait for every process, release the prepared models, then destroy the process group.

    A process that exits with its gloo group alive tears gloo's threads down during interpreter shutdown
    ("terminate called without an active exception", then SIGABRT or SIGBUS; pytorch/pytorch#179291), and one that
    destroys the group while another still works can hang it: hence the barrier, then the explicit destroy.
    The Accelerator holds the DistributedDataParallel wrappers, whose reducers use the group: they are released
    while it is still alive. On an error the group is destroyed at once, so the other processes fail instead of
    waiting forever."""
    try:
        yield accelerator
        accelerator.wait_for_everyone()
    finally:
        accelerator.free_memory()
        accelerator.end_training()
