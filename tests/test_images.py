import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from zsad import ZSADError
from zsad.runtime.images import load_image, to_pixel_values


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def test_16_bit_grey_is_scaled_to_8_bit(tmp_path):
    values = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16).repeat(10, 0).repeat(10, 1)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(image)[0, 19].tolist() == [255, 255, 255]
    assert np.asarray(image)[10, 0].tolist() == [100, 100, 100]


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 20))
    image = load_image(png_bytes(rgba))
    assert np.asarray(image)[0, 0].tolist() == [0, 0, 255]
    assert np.asarray(image)[0, 15].tolist() == [255, 255, 255]


def test_cmyk_and_grey_become_rgb():
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(load_image(png_bytes(cmyk, format="JPEG", quality=100)))[5, 5].tolist() == pytest.approx([255, 0, 0], abs=3)
    grey = load_image(Image.new("L", (20, 20), 77))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image = load_image(png_bytes(wide, format="JPEG", exif=exif))
    assert image.size == (20, 40)


def test_arrays_of_any_dtype():
    assert load_image(np.full((20, 30), 0.5, dtype=np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.zeros((20, 30, 4), dtype=np.uint8)).size == (30, 20)
    with pytest.raises(ZSADError, match="shape"):
        load_image(np.zeros((20, 30, 2), dtype=np.uint8))


@pytest.mark.parametrize(
    "source, message",
    [
        (b"definitely not an image", "Not a readable image"),
        (None, "No image"),
        ("/no/such/file.png", "not found"),
    ],
)
def test_unreadable_inputs(source, message):
    with pytest.raises(ZSADError, match=message):
        load_image(source)


def test_truncated_file_is_refused():
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ZSADError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_bytes(Image.new("1", (9000, 9000)))
    with pytest.raises(ZSADError, match="9000x9000"):
        load_image(bomb)


def test_tiny_image_is_refused():
    with pytest.raises(ZSADError, match="at least"):
        load_image(Image.new("RGB", (4, 40)))


def test_pixel_values_are_normalised_whole_image_resizes():
    image = Image.new("RGB", (50, 30), (255, 0, 0))
    pixels = to_pixel_values([image, image], 28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert pixels.shape == (2, 3, 28, 28) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[:, 0], torch.ones(2, 28, 28))
    torch.testing.assert_close(pixels[:, 1], -torch.ones(2, 28, 28))


def test_tiny_clip_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "zsad", "tiny-clip", str(tmp_path / "clip")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for name in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"]:
        assert (tmp_path / "clip" / name).is_file(), name
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(tmp_path / "clip")
    assert config.vision_config.num_hidden_layers >= 4
