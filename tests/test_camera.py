"""Camera-size images: bounded decoding (JPEG draft, EXIF kept right), display-size outputs with the full-resolution
map on request, tiled inference; and what the Space echoes back to its visitor (file names)."""

import io

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from zsad import AnomalyDetector, ZSADError
from zsad.detection.detector import resize_map, tile_boxes
from zsad.runtime.images import bounded_size, read_image
from zsad.space.config import COMPARE
from zsad.space.files import OutputFolders, full_resolution_files, serving_files
from zsad.space.handlers import make_handler
from zsad.space.testing import upload

from conftest import TEST_IMAGE_SIZE
from image_files import EXIF_ORIENTATION, ROTATE_90_CW, random_rgb


def smooth_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random picture (JPEG-friendly: a coarse random grid upsampled)."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def jpeg(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector.load(methods=["baseline"], clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


def test_a_large_jpeg_is_decoded_at_reduced_size_and_matches_a_full_decode(monkeypatch):
    pixels = smooth_rgb(1600, 1200)
    data = jpeg(pixels)
    decoded_sizes = []
    original_load = Image.Image.load

    def recording_load(image):
        decoded_sizes.append(image.size)
        return original_load(image)

    monkeypatch.setattr(Image.Image, "load", recording_load)
    loaded = read_image(data, max_side=300)
    assert loaded.image.size == (300, 225) and loaded.original_size == (1600, 1200)
    assert decoded_sizes[0] == (400, 300)  # Pillow's draft: scale 1/4 is the smallest that stays >= 300 x 225
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((300, 225), Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(loaded.image, dtype=float) - np.asarray(reference, dtype=float)).mean() < 2.0


def test_bounded_reading_keeps_the_exif_orientation():
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    pixels = smooth_rgb(800, 400)
    pixels[:40, :40] = (255, 0, 0)  # a red corner, top-left as stored
    loaded = read_image(jpeg(pixels, exif=exif), max_side=200)
    assert loaded.original_size == (400, 800) and loaded.image.size == (100, 200)
    red = np.asarray(loaded.image)[:10, -10:].mean(axis=(0, 1))  # turned clockwise: the corner is now top-right
    assert red[0] > 200 and red[1] < 60
    assert read_image(random_rgb(0, 64, 48), max_side=200).image.size == (64, 48)  # small images stay as they are


def test_display_side_bounds_outputs_and_the_full_map_is_the_model_map_resized(detector):
    picture = Image.fromarray(smooth_rgb(640, 480))
    result = detector.detect(picture, "bottle", display_side=200)
    full = detector.detect(picture, "bottle")
    assert result.anomaly_map.shape == result.mask.shape == (150, 200) and result.overlay.size == (200, 150)
    assert result.original_size == full.original_size == (640, 480)
    assert full.anomaly_map.shape == (480, 640) and full.full_resolution_map() is full.anomaly_map
    # the model saw the (antialiased) reduced image instead of the full one: the same map up to resampling noise
    assert result.score == pytest.approx(full.score, abs=0.01)
    np.testing.assert_allclose(result.full_resolution_map(), full.anomaly_map, atol=0.02)
    expected = resize_map(torch.from_numpy(result.model_map), (640, 480))
    np.testing.assert_array_equal(result.full_resolution_map(), expected)


def test_tile_boxes_cover_the_image_with_overlap():
    boxes = tile_boxes((1000, 600), 518, overlap=0.25)
    # 1000 px: two windows would overlap by 36 px (7%), so three (start every 241 px); 600 px: two
    assert boxes == [(0, 0, 518, 518), (241, 0, 759, 518), (482, 0, 1000, 518),
                     (0, 82, 518, 600), (241, 82, 759, 600), (482, 82, 1000, 600)]
    covered = np.zeros((600, 1000), dtype=int)
    for left, top, right, bottom in tile_boxes((1300, 900), 518):
        assert right - left == bottom - top == 518
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    assert tile_boxes((300, 200), 518) == [(0, 0, 300, 200)]  # smaller than a window: one window of the whole image
    with pytest.raises(ZSADError, match="overlap"):
        tile_boxes((1000, 600), 518, overlap=1.0)


def test_tiled_detection_blends_window_maps_and_takes_the_highest_score(detector):
    picture = Image.fromarray(smooth_rgb(200, 150, seed=4))
    steps = []
    result = detector.detect_tiled(picture, "bottle", batch_size=2, progress=lambda done, total: steps.append((done, total)))
    boxes = tile_boxes((200, 150), TEST_IMAGE_SIZE)
    assert result.tiles == len(boxes) == 6 and steps == [(2, 6), (4, 6), (6, 6)]
    windows = [detector.detect(picture.crop(box), "bottle") for box in boxes]
    assert result.score == pytest.approx(max(window.score for window in windows), abs=1e-5)
    total, counts = np.zeros((150, 200)), np.zeros((150, 200))
    for (left, top, right, bottom), window in zip(boxes, windows):
        total[top:bottom, left:right] += window.anomaly_map
        counts[top:bottom, left:right] += 1
    np.testing.assert_allclose(result.anomaly_map, total / counts, atol=1e-5)
    assert result.anomaly_map.shape == (150, 200) and result.overlay.size == (200, 150)
    np.testing.assert_array_equal(result.mask, result.anomaly_map >= 0.5)


# ----- the Space -----------------------------------------------------------------------------------


def test_the_space_shows_display_size_images_and_offers_full_resolution_files(detector, tmp_path):
    path = tmp_path / "upload.jpg"
    path.write_bytes(jpeg(smooth_rgb(640, 480)))
    output = make_handler(detector, display_side=200)(upload(path, "part 7.jpg"), "bottle", "baseline", 0.5)
    original, overlay = output.pair
    assert original.size == overlay.size == output.mask.size == (200, 150)
    folders = OutputFolders()  # kept while its files are read (the app keeps its folders as long as it runs)
    map_file, mask_file = serving_files(full_resolution_files, folders)(output.full_resolution)
    assert map_file.endswith("part 7_anomaly_map.png") and mask_file.endswith("part 7_mask.png")
    full_map, full_mask = np.asarray(Image.open(map_file)), np.asarray(Image.open(mask_file))
    assert full_map.shape == full_mask.shape == (480, 640)
    expected = resize_map(torch.from_numpy(output.full_resolution.kept_map), (640, 480))
    np.testing.assert_array_equal(full_map, np.round(expected * 255).astype(np.uint8))
    np.testing.assert_array_equal(full_mask > 0, expected >= 0.5)


def test_the_space_runs_tiles_for_one_method(detector, tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(smooth_rgb(300, 120)).save(path)
    output = make_handler(detector, display_side=150)(upload(path, "wide.png"), "bottle", "baseline", 0.5, tiles=True)
    original, overlay = output.pair
    assert original.size == overlay.size == output.mask.size == (150, 60)
    tiled = detector.detect_tiled(str(path), "bottle")
    assert tiled.tiles == len(tile_boxes((300, 120), TEST_IMAGE_SIZE)) == 8
    assert "in 8 tiles" in output.report and output.score == round(tiled.score, 4)
    full_map, full_mask = (np.asarray(download.image) for download in output.full_resolution.downloads())
    np.testing.assert_array_equal(full_map, np.round(tiled.anomaly_map * 255).astype(np.uint8))
    np.testing.assert_array_equal(full_mask > 0, tiled.mask)
    two = AnomalyDetector.load(methods=["baseline", "stackclip"], clip=detector.backbone, image_size=TEST_IMAGE_SIZE)
    with pytest.raises(gr.Error, match="one method at a time"):
        make_handler(two)(upload(path, "wide.png"), "bottle", COMPARE, 0.5, tiles=True)


def test_errors_name_the_users_file_not_the_servers_copy(detector, tmp_path):
    server_copy = tmp_path / "f45c0e9a" / "image.png"
    server_copy.parent.mkdir()
    server_copy.write_bytes(b"not a picture at all")
    uploaded = upload(server_copy, "my part.png")
    with pytest.raises(gr.Error) as caught:
        make_handler(detector)(uploaded, "bottle", "baseline", 0.5)
    assert caught.value.message == "Not a readable image 'my part.png'; use a PNG, JPEG, BMP or TIFF file."


def test_bounded_size_keeps_the_aspect():
    assert bounded_size((4000, 3000), 1600) == (1600, 1200) and bounded_size((3000, 4000), 1600) == (1200, 1600)
