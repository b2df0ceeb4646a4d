"""The app launched as users launch it (``python app.py --tiny`` on 127.0.0.1) and driven by ``gradio_client``."""

import csv
import io
import itertools
import json
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from PIL import Image

from zsad import AnomalyDetector
from zsad.space.config import MAX_REFERENCES, offered_methods
from zsad.space.layout import example_rows
from zsad.space.testing import serving_app

APP = Path(__file__).resolve().parent.parent / "app.py"
pytestmark = pytest.mark.integration

QUEUE_SIZE = 8
CLIENTS = 20
MEMORY_REQUESTS = 50
WARM_UP_REQUESTS = 15
LARGE_SIDE = 512
# Allocator noise after warm-up (measured: 0 to +30 MB); keeping each request's results would add ~150 MB.
MEMORY_TOLERANCE_MB = 50
BATCH_IMAGES = 20  # also the server's cap, so one more is refused


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "app.log"
    with serving_app(APP, "--tiny", "--queue-size", str(QUEUE_SIZE), "--batch-max-images", str(BATCH_IMAGES), log=log) as running:
        yield running


@pytest.fixture(scope="module")
def example():
    path, class_name = example_rows()[0]
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
    methods = itertools.cycle(offered_methods({}))
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


def call_raw(url: str, endpoint: str, data: list) -> str:
    """The server-sent events of one raw HTTP call of ``endpoint`` (no gradio_client: payloads as an attacker sends them)."""
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(f"{url}gradio_api/call/{endpoint}", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as response:
        return response.read().decode()


def test_forged_paths_are_refused_on_every_file_input_without_telling_whether_they_exist(server, example):
    """A payload naming a server file (an example image that exists, a path that does not), with and without Gradio's
    file marker, on /detect's image and references and on /detect_batch's uploads: refused, and the answer for an
    existing file is the answer for a missing one."""
    url, _ = server
    existing, class_name = str(Path(example[0]).resolve()), example[1]
    calls = {
        "image": lambda file: ("detect", [file, class_name, "baseline", 0.5, None, False, "calibrated"]),
        "references": lambda file: ("detect", [{"path": existing, "meta": {"_type": "gradio.FileData"}}, class_name, "baseline",
                                               0.5, [file], False, "calibrated"]),
        "batch": lambda file: ("detect_batch", [[file], class_name, "baseline", 0.5]),
    }
    for name, call in calls.items():
        for marked in (False, True):
            answers = []
            for path in (existing, "/etc/passwd", "/no/such/file.png"):
                file = {"path": path, **({"meta": {"_type": "gradio.FileData"}} if marked else {})}
                events = call_raw(url, *call(file))
                assert events.startswith("event: error") and "event: complete" not in events, (name, path, events)
                answers.append(events.replace(path, "PATH"))
            assert answers[0] == answers[1] == answers[2], (name, marked, answers)
            assert "PATH" not in answers[0]  # the path is not even echoed


def test_concurrent_visitors_get_their_own_results_and_full_resolution_files(server, tmp_path):
    """Visitors with images of different sizes detect and download at the same time; each gets files of its own
    image's size, and none finds its files removed by another's request."""
    url, _ = server
    visitors, rounds = 4, 3
    paths = []
    for index in range(visitors):
        path = tmp_path / f"visitor{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (60 + 10 * index, 90, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    start, failures = threading.Barrier(visitors), []

    def visit(index: int) -> None:
        client = Client(url, verbose=False)
        start.wait()
        try:
            for _ in range(rounds):
                mask = client.predict(handle_file(paths[index]), "screw", "baseline", 0.5, api_name="/detect")[1]
                full_map, full_mask = client.predict(api_name="/full_resolution")
                sizes = {Image.open(mask).size, *(Image.open(file["value"] if isinstance(file, dict) else file).size
                                                  for file in (full_map, full_mask))}
                assert sizes == {Image.open(paths[index]).size}, sizes
        except Exception as error:  # noqa: BLE001 - every visitor's failure is reported below
            failures.append(f"visitor {index}: {error!r}")

    threads = [threading.Thread(target=visit, args=(index,)) for index in range(visitors)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert failures == []


# ----- the batch endpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(2)
    paths = []
    for index in range(BATCH_IMAGES + 1):
        path = folder / f"part{index:02d}.png"
        Image.fromarray(rng.integers(0, 256, (48 + index, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def wait_until_processing(job, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while job.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.FINISHED):
        assert time.monotonic() < deadline, f"the batch did not start: {job.status()}"
        time.sleep(0.05)


def test_batch_of_twenty_matches_the_detector_and_single_requests_are_answered_meanwhile(server, example, batch_files,
                                                                                          tiny_clip_path):
    url, _ = server
    call_detect(Client(url, verbose=False), example)  # the single request's text features are cached beforehand
    paths = batch_files[:BATCH_IMAGES]
    job = Client(url, verbose=False).submit([handle_file(path) for path in paths], "metal nut", "baseline", 0.5, False, "slider",
                                           api_name="/detect_batch")  # the slider decides: verdicts for the training-free baseline
    wait_until_processing(job)
    started = time.perf_counter()
    score = call_detect(Client(url, verbose=False), example)[2]
    single_seconds, batch_was_done = time.perf_counter() - started, job.done()
    table, gallery, csv_file, masks_file, summary = job.result(timeout=300)
    batch_seconds = time.perf_counter() - started
    print(f"\nsingle request answered in {single_seconds:.2f} s while a {BATCH_IMAGES}-image batch ran "
          f"(batch done {batch_seconds:.2f} s after the single request started)")
    assert 0.0 <= score <= 1.0 and not batch_was_done  # the batch has its own worker: no waiting behind it

    with open(csv_file, newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [record["file"] for record in records] == [path.name for path in paths]
    # The server's detector: the same tiny CLIP (seed 0), the same default precision.
    detector = AnomalyDetector.load(methods=["baseline"], clip=str(tiny_clip_path), precision="auto")
    for record, path in zip(records, paths):
        expected = detector.detect(path, "metal nut", method="baseline", threshold=0.5)
        assert float(record["score"]) == pytest.approx(expected.score, abs=1e-5), path.name
        assert record["verdict"] == expected.verdict
        assert float(record["anomalous_pixel_percent"]) == pytest.approx(100 * expected.mask.mean(), abs=0.05)
    assert [row[0] for row in table["data"]] == [path.name for path in paths] and len(gallery) == BATCH_IMAGES
    with zipfile.ZipFile(masks_file) as masks:
        assert len(masks.namelist()) == BATCH_IMAGES
        assert Image.open(io.BytesIO(masks.read("part05_mask.png"))).size == Image.open(paths[5]).size
    assert f"of {BATCH_IMAGES} images anomalous" in summary


def test_batch_zip_upload_and_the_count_cap(server, batch_files, tmp_path):
    url, _ = server
    client = Client(url, verbose=False)
    archive = tmp_path / "parts.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in batch_files[:3]:
            zipped.write(path, f"lot-7/{path.name}")
    table = client.predict([handle_file(archive)], "metal nut", "baseline", 0.5, api_name="/detect_batch")[0]
    assert [row[0] for row in table["data"]] == [f"lot-7/{path.name}" for path in batch_files[:3]]
    with pytest.raises(Exception, match=f"holds {BATCH_IMAGES + 1} images; the Space takes at most {BATCH_IMAGES} at a time"):
        client.predict([handle_file(path) for path in batch_files], "metal nut", "baseline", 0.5, api_name="/detect_batch")


def test_a_batch_scored_against_each_other_through_the_api(server, batch_files):
    url, _ = server
    result = Client(url, verbose=False).predict([handle_file(path) for path in batch_files[:3]], "", "baseline", 0.5, True,
                                                api_name="/detect_batch")
    table, summary = result[0], result[4]
    assert [row[0] for row in table["data"]] == [path.name for path in batch_files[:3]]
    assert "each image was compared with 2 other images" in summary


@pytest.fixture(scope="module")
def good_parts(tmp_path_factory, example):
    """Three good parts of the example's product (the synthetic generator's train/good images)."""
    from zsad.data.synthetic import generate

    category = example[1]
    root = generate(tmp_path_factory.mktemp("good-parts"), categories=[category], num_good=0, num_defective=0, image_size=96,
                    num_train_good=3)
    return sorted(str(path) for path in (root / category / "train" / "good").glob("*.png"))


def test_reference_images_calibrate_the_verdict_through_the_api(server, example, good_parts, tmp_path):
    url, _ = server
    client = Client(url, verbose=False)
    path, class_name, _ = example
    references = [handle_file(part) for part in good_parts]
    outputs = client.predict(handle_file(path), class_name, "baseline", 0.5, references, api_name="/detect")
    report = outputs[3]
    assert "3 reference images of good parts; calibrated on 3 good images: at most 1 in 4 good parts flagged; image threshold" in report
    threshold = float(report.split("image threshold ")[1].split(",")[0])
    verdict_threshold = float(report.split("(threshold ")[1].split(")")[0])
    # The verdict used the calibrated threshold (shown there with 2 decimals, in the calibration line with 3).
    assert abs(verdict_threshold - threshold) <= 0.0051 and verdict_threshold != 0.5
    again = client.predict(handle_file(path), class_name, "baseline", 0.5, references, api_name="/detect")[3]
    assert again.split("request took")[0] == report.split("request took")[0]  # the same call, the same answer
    by_hand = client.predict(handle_file(path), class_name, "baseline", 0.5, references, False, "slider", api_name="/detect")[3]
    assert "threshold 0.5 set by hand" in by_hand
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(Exception, match="Reference image 2: Not a readable image"):
        client.predict(handle_file(path), class_name, "baseline", 0.5, [references[0], handle_file(str(not_an_image))],
                       api_name="/detect")
    too_many = (references * MAX_REFERENCES)[:MAX_REFERENCES + 1]
    with pytest.raises(Exception, match=f"{MAX_REFERENCES + 1} reference images were given; at most {MAX_REFERENCES} are used"):
        client.predict(handle_file(path), class_name, "baseline", 0.5, too_many, api_name="/detect")
    assert "No reference images (zero-shot)" in call_detect(client, example)[3]  # still serving, references optional
