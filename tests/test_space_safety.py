"""The Space's files and limits: the upload size limit given to Gradio, Gradio's cache cleaned like zsad's own
folders, the output folders removed when the app is stopped (SIGTERM, normal exit), pasted images bounded; elongated
(line-scan) images scored as at full size; profiles refused when built from flat or non-finite maps."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zsad
from zsad import AnomalyDetector
from zsad.space import config, files, layout, uploads
from zsad.space.testing import upload

from conftest import TEST_IMAGE_SIZE

SHUTDOWN = Path(__file__).resolve().parent.parent / "zsad" / "space" / "shutdown.py"


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector.load(methods=["baseline"], clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


def test_upload_size_limit_has_a_stated_default_a_flag_and_an_environment_variable(monkeypatch):
    monkeypatch.delenv("ZSAD_MAX_FILE_SIZE", raising=False)
    assert config.launch_options(config.build_parser().parse_args([])) == {"max_file_size": 200 * 2**20}
    assert config.build_parser().parse_args(["--max-file-size", "1gb"]).max_file_size == 2**30
    assert config.build_parser().parse_args(["--max-file-size", "512 KB"]).max_file_size == 512 * 1024
    monkeypatch.setenv("ZSAD_MAX_FILE_SIZE", "50mb")
    assert config.launch_options(config.build_parser().parse_args([])) == {"max_file_size": 50 * 2**20}
    for bad in ["lots", "5 pb", "-3mb", "1.5mb"]:
        with pytest.raises(SystemExit):
            config.build_parser().parse_args(["--max-file-size", bad])


def test_size_is_read_as_gradio_reads_it():
    from gradio.utils import _parse_file_size

    for text in ["200mb", "7b", "3kb", "2gb"]:
        assert config.file_size(text) == _parse_file_size(text)


def test_page_cleans_gradios_cache_and_writes_request_folders_under_the_apps_root(detector, tmp_path, good_files):
    root = tmp_path / "outputs"
    root.mkdir()
    demo = layout.build_demo(detector, output_root=root)
    assert demo.delete_cache == (300, 600) and demo.delete_cache[1] == files.FOLDER_LINGER_SECONDS
    detect = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}["detect"].fn
    path, _ = good_files["rgb"]
    (original, overlay), mask, *_ = detect(upload(path), "bottle", "baseline", 0.5)
    assert Path(mask).is_file() and Path(mask).parent.parent == root  # a request folder inside the app's root


def stopped_app(folder: Path, before: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A process that installs the app's clean-up for ``folder`` after running ``before``, then receives SIGTERM (the
    module is loaded by its path: it needs nothing but the standard library)."""
    script = textwrap.dedent(f"""
        import importlib.util, os, pathlib, signal, sys, time
        spec = importlib.util.spec_from_file_location("shutdown", {str(SHUTDOWN)!r})
        shutdown = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shutdown)
        {before}
        shutdown.remove_when_stopped(pathlib.Path({str(folder)!r}))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)


def request_folders(tmp_path: Path) -> Path:
    folder = tmp_path / "zsad-space-x"
    (folder / "request-1").mkdir(parents=True)
    (folder / "request-1" / "masks.zip").write_bytes(b"zip")
    return folder


def test_sigterm_removes_the_output_folders_then_ends_the_process_as_sigterm_does(tmp_path):
    folder = request_folders(tmp_path)
    result = stopped_app(folder, "", tmp_path)
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert not folder.exists()


def test_sigterm_handler_chains_the_one_installed_before(tmp_path):
    folder = request_folders(tmp_path)
    before = "signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path('previous-ran').write_text('yes'), sys.exit(3)))"
    result = stopped_app(folder, before, tmp_path)
    assert result.returncode == 3, result.stderr
    assert (tmp_path / "previous-ran").read_text() == "yes" and not folder.exists()


def test_normal_exit_removes_the_output_folders(tmp_path):
    folder = request_folders(tmp_path)
    script = (f"import importlib.util, pathlib; spec = importlib.util.spec_from_file_location('shutdown', {str(SHUTDOWN)!r}); "
              "shutdown = importlib.util.module_from_spec(spec); spec.loader.exec_module(shutdown); "
              f"shutdown.remove_when_stopped(pathlib.Path({str(folder)!r}))")
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 0
    assert not folder.exists()


def test_a_pasted_image_over_the_limit_is_refused_before_it_is_decoded():
    size = uploads.MAX_PASTED_MEGABYTES * 2**20 + 3
    url = "data:image/png;base64," + "A" * (size * 4 // 3 + 4)  # valid base64 of zero bytes, never decoded
    with pytest.raises(zsad.ZSADError, match=f"at most {uploads.MAX_PASTED_MEGABYTES} MB pasted. Upload it as a file"):
        uploads.received_file({"path": None, "url": url})
    small = "data:image/png;base64," + "A" * 400
    assert uploads.received_file({"path": None, "url": small}).source == bytes(300)


def test_bounding_the_longest_side_keeps_the_short_side_the_model_sees():
    from zsad.runtime.images import bounded_size

    assert bounded_size((4000, 3000), 1000) == (1000, 750)  # photos: the longest side bounded as before
    assert bounded_size((5000, 64), 1000) == (5000, 64)  # a line-scan image stays whole (was 1000x13, refused)
    assert bounded_size((8000, 600), 1000) == (6907, 518)  # the short side not below 518 px
    assert bounded_size((600, 400), 1000) == (600, 400)  # never enlarged
    assert bounded_size((5000, 64), 300) == (1250, 16)  # a bound under the model's side: still never refused


def test_a_line_scan_image_is_scored_by_the_space_as_by_the_detector_at_full_size(detector, tmp_path):
    import numpy as np
    from PIL import Image

    from zsad.space import handlers

    path = tmp_path / "line.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 5000, 3), dtype=np.uint8)).save(path)
    output = handlers.make_handler(detector)(upload(path), "bottle", "baseline", 0.5)
    assert output.score == round(detector.detect(str(path), "bottle", method="baseline").score, 4)
    assert output.pair[0].size == output.pair[1].size == output.mask.size == (5000, 64)


def test_a_profile_is_refused_when_built_from_flat_or_non_finite_maps():
    import torch

    from zsad.detection.references import FusionScale, SourceMaps

    def good(method_map, reference_map):
        return [SourceMaps(method_map, reference_map, torch.zeros(2), torch.zeros(2))]

    varied = torch.linspace(0, 1, 2 * 8 * 8).reshape(2, 8, 8)
    scale = FusionScale.from_good(good(varied, varied * 2), 0.5)
    assert scale.method_location == pytest.approx(0.5) and scale.method_spread == pytest.approx(0.49, abs=1e-6)
    assert scale.reference_spread == pytest.approx(2 * 0.49, abs=1e-6)
    with pytest.raises(zsad.ZSADError, match="good images' reference maps are flat"):
        FusionScale.from_good(good(varied, torch.full((2, 8, 8), 0.3)), 0.5)
    with pytest.raises(zsad.ZSADError, match="method's maps hold non-finite values"):
        FusionScale.from_good(good(varied.clone().fill_(float("nan")), varied), 0.5)
