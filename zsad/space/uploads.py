"""The one way files come into the Space: ``received_file`` takes a file input's payload and accepts only a file
that Gradio received as an upload (in its upload cache), never a path a client names; zips are opened member by
member, and every image's size is read from its header before anything is decoded."""

import base64
import binascii
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradio.utils import get_upload_folder

from zsad.modeling.exceptions import ZSADError
from zsad.runtime.images import IMAGE_SUFFIXES, LoadedImage, header_size, read_image

from .config import BatchCaps

# A pasted image (a data URL in the request itself, not an upload, so Gradio's max_file_size does not bound it) is
# refused above this many megabytes of image before it is decoded.
MAX_PASTED_MEGABYTES = 25
NOT_UPLOADED = "A file of this request was not uploaded to the Space; upload it (through the page, or gradio_client's handle_file)."
ADVICE = "Split it into smaller batches, or run `zsad predict` on a folder (no limit)."
# Member failures a zip can raise on reading; each becomes its row's error.
ZIP_READ_ERRORS = (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError)


@dataclass(frozen=True)
class Upload:
    """A received file: the user's own name for it and what zsad reads (a path in Gradio's upload cache, or the
    bytes of a pasted image)."""

    name: str
    source: str | bytes


def received_file(payload) -> Upload | None:
    """A file input's payload (Gradio's file data, unprocessed) as an ``Upload``; None when no file was given.

    Only a regular file inside Gradio's upload cache is accepted (Gradio puts every upload there; the path is
    resolved first, so neither ``..`` nor a link leads out). Any other path is refused with the same message
    whether it exists or not."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise ZSADError(NOT_UPLOADED)
    path, url = payload.get("path"), payload.get("url") or ""
    if not path and url.startswith("data:") and "," in url:
        return Upload("the pasted image", pasted_bytes(url))
    if not isinstance(path, str) or not in_upload_cache(path):
        raise ZSADError(NOT_UPLOADED)
    return Upload(payload.get("orig_name") or Path(path).name, path)


def received_files(payloads) -> list[Upload]:
    return [upload for upload in map(received_file, payloads or []) if upload is not None]


def in_upload_cache(path: str) -> bool:
    resolved, cache = os.path.realpath(path), os.path.realpath(get_upload_folder())
    return os.path.commonpath([resolved, cache]) == cache and resolved != cache and os.path.isfile(resolved)


def pasted_bytes(url: str) -> bytes:
    encoded = url.partition(",")[2]
    if len(encoded) * 3 / 4 > MAX_PASTED_MEGABYTES * 2**20:  # base64: 4 characters per 3 bytes
        raise ZSADError(f"The pasted image is {len(encoded) * 3 / 4 / 2**20:.0f} MB; the Space takes at most {MAX_PASTED_MEGABYTES} MB "
                        "pasted. Upload it as a file instead (the Space's upload limit applies), or downscale it.")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ZSADError("The pasted image could not be read; paste or upload it again.") from error


def upload_size(upload: Upload) -> tuple[int, int]:
    """(width, height) from the upload's header, not decoded; a file that is not an image is refused by its name."""
    return header_size(upload.source if isinstance(upload.source, str) else io.BytesIO(upload.source), upload.name)


def read_upload(upload: Upload, max_side: int | None = None) -> LoadedImage:
    """The upload decoded (its header checked first, so every message names the user's file)."""
    upload_size(upload)
    return read_image(upload.source, name=upload.name, max_side=max_side)


def content_hash(upload: Upload) -> str:
    digest = hashlib.sha256()
    if isinstance(upload.source, bytes):
        digest.update(upload.source)
    else:
        with open(upload.source, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----- batches ---------------------------------------------------------------------------------------


@dataclass
class BatchImage:
    """One row of a batch: its name as given (a file name or a zip member's path), how to read it, and the error
    (or "skipped: ...") that keeps it from being scored."""

    name: str
    read: Callable[[], str | bytes] | None = None
    error: str | None = None
    skipped: bool = False
    pixels: int = 0


def batch_images(payloads, caps: BatchCaps) -> list[BatchImage]:
    """The uploaded image files and the images inside uploaded zips, within the caps: count and bytes first, then
    each image's header (a member that cannot be read, or one image too large, becomes its row's error), then the
    batch's pixels."""
    images, total_bytes = [], 0
    for upload in received_files(payloads):
        if upload.name.lower().endswith(".zip"):
            entries, entry_bytes = zip_images(upload)
            images += entries
            total_bytes += entry_bytes
        else:
            images.append(BatchImage(upload.name, read=lambda source=upload.source: source))
            total_bytes += os.path.getsize(upload.source) if isinstance(upload.source, str) else len(upload.source)
    check_batch_caps(sum(not image.skipped for image in images), total_bytes, caps)
    for image in images:
        if image.error is None:
            check_image_pixels(image, caps)
    check_batch_pixels(images, caps)
    return with_unique_names(images)


def zip_images(upload: Upload) -> tuple[list[BatchImage], int]:
    """The image members of a zip (folders, macOS resource forks and other files are left out; a zip inside is a
    row "skipped"), each read on demand, and their uncompressed size as the zip states it."""
    try:
        with zipfile.ZipFile(upload.source) as archive:
            members = [info for info in archive.infolist() if not info.is_dir() and is_listed(info.filename)]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ZSADError(f"{upload.name} is not a readable zip archive; zip the images again.") from error
    entries = []
    for info in members:
        if info.filename.lower().endswith(".zip"):
            entries.append(BatchImage(info.filename, error="a zip inside a zip is not opened; add its images to the outer zip",
                                      skipped=True))
        else:
            entries.append(BatchImage(info.filename, read=lambda info=info: read_zip_member(upload, info), error=member_problem(info)))
    return entries, sum(info.file_size for info in members if not info.filename.lower().endswith(".zip"))


def is_listed(name: str) -> bool:
    """Image files and zips in a zip, without macOS's resource-fork copies (``__MACOSX/``, ``._name``)."""
    suffix = Path(name).suffix.lower()
    return (suffix in IMAGE_SUFFIXES or suffix == ".zip") and "__MACOSX" not in name and not Path(name).name.startswith("._")


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member cannot be read, as far as its directory entry tells (encryption, compression method)."""
    if info.flag_bits & 0x1:
        return "encrypted in the zip (password-protected); zip it again without a password"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        return "compressed with a method the Space cannot read; zip it again with the standard (deflate) method"
    return None


def read_zip_member(upload: Upload, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes; any failure (bad checksum, a size that lies, a damaged stream) as a ``ZSADError`` naming it."""
    try:
        with zipfile.ZipFile(upload.source) as archive:
            return archive.read(info)
    except ZIP_READ_ERRORS as error:
        raise ZSADError(f"'{info.filename}' is damaged in the zip (its data, checksum or size do not match); zip it again.") from error


def check_image_pixels(image: BatchImage, caps: BatchCaps) -> None:
    """Reads the image's header; a failure or an image over the per-image cap becomes the row's error."""
    try:
        source = image.read()
        width, height = header_size(source if isinstance(source, str) else io.BytesIO(source), image.name)
    except ZSADError as error:
        image.error = str(error)
        return
    if width * height > caps.max_image_megapixels * 1e6:
        image.error = (f"'{image.name}' is {width}x{height} pixels, more than the {caps.max_image_megapixels:g} megapixels the Space "
                       "scores per batch image; run `zsad predict` on it (no limit) or downscale it.")
        return
    image.pixels = width * height


def check_batch_caps(count: int, total_bytes: int, caps: BatchCaps) -> None:
    if count == 0:
        raise ZSADError("The batch holds no images: drop image files (PNG, JPEG, BMP, TIFF, WebP) or a zip of them.")
    if count > caps.max_images:
        raise ZSADError(f"The batch holds {count} images; the Space takes at most {caps.max_images} at a time. {ADVICE}")
    if total_bytes > caps.max_megabytes * 2**20:
        raise ZSADError(
            f"The batch holds {total_bytes / 2**20:.1f} MB of images (zips counted uncompressed); the Space takes at most "
            f"{caps.max_megabytes:g} MB at a time. {ADVICE}"
        )


def check_batch_pixels(images: list[BatchImage], caps: BatchCaps) -> None:
    total = sum(image.pixels for image in images)
    if total > caps.max_megapixels * 1e6:
        raise ZSADError(f"The batch holds {total / 1e6:.0f} megapixels of images; the Space takes at most {caps.max_megapixels:g} "
                        f"megapixels at a time. {ADVICE}")


def with_unique_names(images: list[BatchImage]) -> list[BatchImage]:
    """Repeated names (the same file name in two uploads or zips) get " (2)", " (3)", ... before their suffix."""
    seen: dict[str, int] = {}
    for image in images:
        seen[image.name] = seen.get(image.name, 0) + 1
        if seen[image.name] > 1:
            stem, suffix = os.path.splitext(image.name)
            image.name = f"{stem} ({seen[image.name]}){suffix}"
    return images


def safe_base_name(name: str) -> str:
    """A name's last part, safe as an archive entry anywhere: no folders (``/`` or ``\\``), drive, leading dots or
    characters outside letters, digits, ``._-()`` and space."""
    base = re.split(r"[\\/]", name)[-1]
    base = re.sub(r"^[A-Za-z]:", "", base)
    base = re.sub(r"[^\w.\-() ]", "_", base).lstrip(". ")
    return base or "image"


def mask_names(names: list[str]) -> list[str]:
    """``<safe stem>_mask.png`` for every name, unique (case-insensitively) across the batch: ``b.png`` and ``b.jpg``
    give ``b_mask.png`` and ``b (2)_mask.png``."""
    taken: set[str] = set()
    result = []
    for name in names:
        stem = os.path.splitext(safe_base_name(name))[0] or "image"
        candidate, number = f"{stem}_mask.png", 1
        while candidate.lower() in taken:
            number += 1
            candidate = f"{stem} ({number})_mask.png"
        taken.add(candidate.lower())
        result.append(candidate)
    return result
