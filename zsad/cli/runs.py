"""Which run owns an output folder, and one process at a time in it.

A run writes ``run.json`` (its settings and the provenance of its model) into its folder before any result; ``--resume``
continues only the run recorded there and otherwise names what differs. While a run writes, it holds the folder's lock
(``.zsad.lock``): a second process on the folder is refused. The lock is an OS file lock (``filelock``), so the
operating system releases it when its process ends, however it ends: a crash or a kill leaves no stale lock.

```python
>>> record = run_record(detector.provenance("stackclip", "screw", "screw", rule), {"tiles": False})
>>> with folder_lock("results/"):
...     claim_folder("results/", record, resume=False, clear=["records-*.jsonl"])
```
"""

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

from ..modeling.exceptions import ZSADError
from ..runtime.atomic import write_text_atomic

RUN_FILE = "run.json"
LOCK_FILE = ".zsad.lock"


def run_record(provenance: dict, settings: dict) -> dict:
    """What ``run.json`` holds: the run's provenance block (``zsad.runtime.provenance``: model, backbone, precision, product,
    threshold rule) and its other settings, as JSON values."""
    return json.loads(json.dumps({"settings": settings, "provenance": provenance}))


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold ``folder``'s lock, or a ZSADError at once when another process holds it."""
    folder = Path(folder)
    lock = FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout as error:
        raise ZSADError(f"Another zsad process is writing to {folder} (it holds {folder / LOCK_FILE}); wait for it to finish "
                        "or give --out another folder.") from error
    try:
        yield
    finally:
        lock.release()


def claim_folder(folder: str | Path, record: dict, resume: bool, clear: Sequence[str] = ()) -> None:
    """Make ``record``'s run the owner of ``folder``.

    ``resume``: the folder must be owned by the same run (or hold nothing to resume), else a ZSADError naming what
    differs. Otherwise the earlier run's files matching the ``clear`` globs and its ``run.json`` are removed first, then
    the new ``run.json`` is written, so a kill in between leaves a folder that no ``--resume`` can mistake for this run.
    """
    folder = Path(folder)
    path = folder / RUN_FILE
    if resume and path.is_file():
        differences = run_differences(read_run(path), record)
        if differences:
            raise ZSADError(f"--resume continues only the run that owns {folder}, and this one differs: {'; '.join(differences)}. "
                            "Give a new --out for this run, or leave out --resume to start over in this folder.")
        return
    if resume and any(any(folder.glob(pattern)) for pattern in clear):
        raise ZSADError(f"{folder} holds results but no {RUN_FILE} saying which run made them, so they cannot be resumed safely; "
                        "give a new --out, or leave out --resume to start over in this folder.")
    path.unlink(missing_ok=True)
    for pattern in clear:
        for stale in folder.glob(pattern):
            stale.unlink()
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")


def read_run(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ZSADError(f"{path} could not be read ({error}); leave out --resume to start over in this folder.") from error
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict) or not isinstance(record.get("provenance"), dict):
        raise ZSADError(f"{path} is not a zsad run record; leave out --resume to start over in this folder.")
    return record


def run_differences(owner: dict, record: dict) -> list[str]:
    """'name: X then, Y now' for every setting and provenance entry that differs between two run records."""
    differences = []
    for part in ("settings", "provenance"):
        before, now = owner[part], record[part]
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                differences.append(f"{key}: {_shown(before.get(key))} then, {_shown(now.get(key))} now")
    return differences


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
