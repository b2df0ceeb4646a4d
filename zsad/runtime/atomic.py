"""Files and folders written so that a kill at any moment leaves either the old artefact or the new one, never a mix
or a truncated file: everything is written into a temporary sibling, flushed to disk (fsync), then renamed into place.

```python
>>> with atomic_folder("profile/", marker="profile.json") as staging:   # a multi-file artefact
...     (staging / "profile.json").write_text("{}")
>>> write_text_atomic("out/scores.json", "{}")                          # one file
>>> with atomic_file("run/training_state.pt") as temporary:              # one file written by a library
...     torch.save(state, temporary)
```

Hand-written (a few lines over ``os.replace`` and ``os.fsync``) because the libraries that did this
(``atomicwrites``) are unmaintained and none replaces a whole folder.
"""

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..modeling.exceptions import ZSADError

# The modes a plain open()/mkdir() gives under the usual umask 022 (mkstemp and mkdtemp make private ones; reading the
# umask would mean setting it, a process-wide change).
FILE_MODE, FOLDER_MODE = 0o644, 0o755


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    temporary.chmod(FILE_MODE)
    try:
        yield temporary
        fsync(temporary)
        os.replace(temporary, path)
        fsync(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), or, after a kill, what it held before."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_folder(target: str | Path, marker: str) -> Iterator[Path]:
    """A fresh temporary folder next to ``target`` to write an artefact into; on success its files are fsynced and it
    replaces ``target``.

    ``target`` may be absent, empty, or an earlier artefact of the same kind (it holds ``marker``, e.g. profile.json);
    any other folder is refused, so a mistyped ``--out .`` never deletes a user's files. Replacing an existing folder is
    two renames (the old one aside, the new one in); a kill between them leaves the old artefact beside the target
    under ``.NAME.old-*`` and no folder at ``target``, never a mix of the two.
    """
    target = Path(target)
    check_replaceable(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    staging.chmod(FOLDER_MODE)
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                fsync(path)
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_replaceable(target: Path, marker: str) -> None:
    """A ZSADError unless ``target`` is absent, an empty folder or a folder holding ``marker``."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ZSADError(f"'{target}' is a file; give a folder (new, or one written by zsad before) to write to.")
    if any(target.iterdir()) and not (target / marker).is_file():
        raise ZSADError(f"'{target}' already holds other files (no {marker}); give a new or empty folder so that nothing "
                        "of yours is replaced.")


def _replace_folder(staging: Path, target: Path) -> None:
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, aside)
        os.rename(staging, target)
        shutil.rmtree(aside)
    else:
        os.rename(staging, target)
    fsync(target.parent)


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
