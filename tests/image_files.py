"""Image files of every kind a user may upload (good and bad), written on the fly for the inference/app tests."""

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 96, 64  # non-square on purpose: maps must come back at the image's own size
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF: the stored pixels must be turned 90 degrees clockwise to be upright


def random_rgb(seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_good_images(directory: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """name -> (file, upright (width, height)) for RGB, 16-bit, CMYK, RGBA, grayscale and EXIF-rotated files."""
    directory.mkdir(parents=True, exist_ok=True)
    rgb = random_rgb()
    files = {}

    def save(name, image, upright_size=(WIDTH, HEIGHT), **options):
        path = directory / name
        image.save(path, **options)
        files[path.stem] = (path, upright_size)

    save("rgb.png", Image.fromarray(rgb))
    save("gray16.png", Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).convert("I;16"))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, dtype=np.uint8)])
    save("rgba.png", Image.fromarray(rgba, mode="RGBA"))
    save("gray.png", Image.fromarray(rgb[..., 1], mode="L"))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    save("exif_rotated.jpg", Image.fromarray(rgb), upright_size=(HEIGHT, WIDTH), exif=exif)
    assert Image.open(files["gray16"][0]).mode.startswith("I")
    assert Image.open(files["cmyk"][0]).mode == "CMYK"
    return files


def write_bad_images(directory: Path) -> dict[str, Path]:
    """name -> file for a non-image, a truncated PNG and a decompression bomb (a header claiming 20000x20000)."""
    directory.mkdir(parents=True, exist_ok=True)
    not_image = directory / "notes.png"
    not_image.write_bytes(b"this is a text file, not a picture\n" * 4)
    good = directory / "good.png"
    Image.fromarray(random_rgb(1)).save(good)
    truncated = directory / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    bomb = directory / "bomb.png"
    bomb.write_bytes(_png_with_claimed_size(good.read_bytes(), 20_000, 20_000))
    return {"unreadable": not_image, "truncated": truncated, "bomb": bomb}


def _png_with_claimed_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR chunk rewritten to claim another size (valid CRC, so Pillow reads the header)."""
    ihdr_start = 8  # after the signature: length (4), b"IHDR" (4), data (13), CRC (4)
    data = bytearray(png[ihdr_start + 8 : ihdr_start + 8 + 13])
    data[0:8] = struct.pack(">II", width, height)
    chunk = b"IHDR" + bytes(data)
    rewritten = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return png[:ihdr_start] + rewritten + png[ihdr_start + 25 :]
