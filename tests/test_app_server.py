"""The app launched as users launch it (``python app.py --tiny`` on 127.0.0.1) and driven by ``gradio_client``."""

import itertools
import json
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import app
import zsad

from app_server import serving_app

APP = Path(app.__file__)

QUEUE_SIZE = 8
CLIENTS = 20
MEMORY_REQUESTS = 50
WARM_UP_REQUESTS = 15
LARGE_SIDE = 512
# Allocator noise after warm-up (measured: 0 to +30 MB); keeping each request's results would add ~150 MB.
MEMORY_TOLERANCE_MB = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "app.log"
    with serving_app(APP, "--tiny", "--queue-size", str(QUEUE_SIZE), log=log) as running:
        yield running


@pytest.fixture(scope="module")
def example():
    path, class_name = app.example_rows()[0]
    return path, class_name, Image.open(path).size


def call_detect(client: Client, example, method: str = "baseline", threshold: float = 0.5):
    path, class_name, _ = example
    return client.predict(handle_file(path), class_name, method, threshold, api_name="/detect")


def test_detect_returns_overlay_mask_and_score(server, example):
    url, _ = server
    client = Client(url, verbose=False)
    before_after, mask, score, report, table, views, downloads = call_detect(client, example)
    size = example[2]
    assert [Image.open(path).size for path in before_after] == [size, size]
    assert Image.open(mask).size == size and Image.open(mask).mode == "L"
    assert 0.0 <= score <= 1.0
    assert "Tiny" not in report and "CLIP baseline (training-free)" in report
    assert table["data"][0][2] == score and views == [] and downloads is None
    full_map, full_mask = client.predict(api_name="/full_resolution")
    assert [Image.open(file["value"] if isinstance(file, dict) else file).size for file in (full_map, full_mask)] == [size, size]


def test_tiny_banner_is_on_the_page(server):
    url, _ = server
    with urllib.request.urlopen(url + "config", timeout=10) as response:
        assert "Tiny random CLIP" in response.read().decode()


def test_a_user_error_is_reported_and_the_app_keeps_serving(server, example):
    url, _ = server
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="class name is empty"):
        client.predict(handle_file(example[0]), "  ", "baseline", 0.5, api_name="/detect")
    assert 0.0 <= call_detect(client, example)[2] <= 1.0


def test_twenty_clients_at_once_are_answered_or_told_the_queue_is_full(server, example):
    url, _ = server
    start = threading.Barrier(CLIENTS)
    outcomes = [None] * CLIENTS

    def request(index: int) -> None:
        # Each client connects after the barrier: a connection opened earlier and left idle past the server's
        # keep-alive time can be closed just as the request goes out, which no real client does on purpose.
        start.wait()
        try:
            outcomes[index] = ("answered", call_detect(Client(url, verbose=False), example)[2])
        except Exception as error:  # noqa: BLE001 - the test sorts every outcome below
            outcomes[index] = ("refused", str(error))

    threads = [threading.Thread(target=request, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    answered = [value for kind, value in outcomes if kind == "answered"]
    refused = [value for kind, value in outcomes if kind == "refused"]
    print(f"\n{len(answered)} of {CLIENTS} answered, {len(refused)} told the queue is full (max size {QUEUE_SIZE})")
    assert len(answered) + len(refused) == CLIENTS
    assert answered and all(0.0 <= score <= 1.0 for score in answered)
    assert all("queue is full" in message.lower() for message in refused), refused
    assert 0.0 <= call_detect(Client(url, verbose=False), example)[2] <= 1.0  # still answering afterwards


def test_memory_does_not_grow_across_fifty_requests(server, example, tmp_path):
    """A large input makes every request's results (map, original, overlay, mask: ~3 MB) big against the tolerance,
    so keeping them would show; the warm-up lets the allocator and Gradio's worker threads settle first."""
    url, process = server
    path, class_name, _ = example
    large = tmp_path / "large.png"
    Image.open(path).resize((LARGE_SIDE, LARGE_SIDE)).save(large)
    client = Client(url, verbose=False)
    methods = itertools.cycle(app.ordered_methods(zsad.METHODS))
    call = lambda: client.predict(handle_file(large), class_name, next(methods), 0.5, api_name="/detect")  # noqa: E731
    for _ in range(WARM_UP_REQUESTS):
        call()
    rss_before = psutil.Process(process.pid).memory_info().rss / 2**20
    started = time.perf_counter()
    for _ in range(MEMORY_REQUESTS):
        call()
    seconds = (time.perf_counter() - started) / MEMORY_REQUESTS
    rss_after = psutil.Process(process.pid).memory_info().rss / 2**20
    print(
        f"\nRSS {rss_before:.1f} MB after {WARM_UP_REQUESTS} warm-up requests, {rss_after:.1f} MB after "
        f"{MEMORY_REQUESTS} more ({rss_after - rss_before:+.1f} MB; tolerance {MEMORY_TOLERANCE_MB} MB); "
        f"{seconds:.2f} s per {LARGE_SIDE}x{LARGE_SIDE} request"
    )
    assert rss_after - rss_before < MEMORY_TOLERANCE_MB


def test_server_files_that_were_not_uploaded_are_refused(server, example):
    """The handler reads raw payloads (preprocess=False); Gradio's check that a path was uploaded still applies."""
    url, _ = server
    not_uploaded = {"path": str(Path(example[0]).resolve()), "meta": {"_type": "gradio.FileData"}}
    for image in (not_uploaded, str(Path(example[0]).resolve())):
        body = json.dumps({"data": [image, example[1], "baseline", 0.5]}).encode()
        request = urllib.request.Request(url + "gradio_api/call/detect", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            event_id = json.load(response)["event_id"]
        with urllib.request.urlopen(f"{url}gradio_api/call/detect/{event_id}", timeout=30) as response:
            events = response.read().decode()
        assert events.startswith("event: error") and "complete" not in events
