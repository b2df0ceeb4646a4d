"""Testing the Space without the tests: a Gradio app (such as ``app.py``) run in a subprocess for end-to-end tests and
benchmarks, and the payload Gradio hands a handler for an upload."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gradio.utils import get_upload_folder


class AppServerError(RuntimeError):
    """The app exited or did not answer in time; the message holds the end of its output."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving_app(app: str | Path, *arguments: str, log: str | Path | None = None,
                timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``python APP ARGUMENTS`` on a free 127.0.0.1 port (through Gradio's environment variables), offline,
    and yield ``(url, process)`` once it answers; the server is stopped afterwards. Its output goes to ``log``."""
    port = free_port()
    environment = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                   "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    app = Path(app).resolve()
    with open(log or os.devnull, "w") as output:
        process = subprocess.Popen([sys.executable, str(app), *arguments], cwd=app.parent, env=environment,
                                   stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, process, Path(log) if log else None, timeout)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AppServerError(f"The app exited with {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AppServerError(f"The app did not serve {url} within {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text()[-4000:] if log else "(no log kept)"


def upload(path: str | Path, name: str | None = None) -> dict:
    """``path`` copied into Gradio's upload cache, as the unprocessed payload of a file input after an upload
    (``name``: the visitor's own file name, by default the file's)."""
    folder = Path(get_upload_folder())
    folder.mkdir(parents=True, exist_ok=True)
    copy = Path(tempfile.mkdtemp(prefix="zsad-upload-", dir=folder)) / Path(path).name
    shutil.copyfile(path, copy)
    return {"path": str(copy), "url": None, "orig_name": name or Path(path).name, "meta": {"_type": "gradio.FileData"}}
