"""What the Space does when it is stopped: the visitors' output folders are removed at a normal exit (Ctrl-C) and on
SIGTERM (a Space restarting, ``docker stop``), which Python's own clean-up at exit never reaches (the default SIGTERM
action ends the process at once)."""

import atexit
import os
import shutil
import signal
from pathlib import Path


def remove_on_sigterm(folder: Path) -> None:
    """Installs, once at start, a SIGTERM handler that removes ``folder`` and then does what the handler it replaces
    did: calls it (a Python handler), ends the process as SIGTERM does by default, or goes on (ignored)."""
    previous = signal.getsignal(signal.SIGTERM)

    def remove_then_chain(signum, frame):
        shutil.rmtree(folder, ignore_errors=True)
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):  # None: a handler not installed from Python, taken as the default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, remove_then_chain)


def remove_when_stopped(folder: Path) -> None:
    """``folder`` removed when the process exits normally or on SIGTERM (install once, at start)."""
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    remove_on_sigterm(folder)
