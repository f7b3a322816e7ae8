"""What the bot accepts as a job's result: checked PNG/JPEG bytes from the event, never a path.

Why bytes on the wire rather than a path into a shared outputs folder: an engine in remote mode
or a Redis worker runs on another host and cannot share a folder with the bot, and a path is an
invitation to read anything (a forged ``Completed`` naming ``/proc/self/environ`` once made the
bot post its own environment). So every ``Completed`` image carries its bytes (``data_b64``;
Redis workers send them beside the event and the dispatcher puts them back); this module checks
them (size, a PNG or JPEG that fully decodes, pixel count within what the configured limits can
produce, so no decompression bomb and no truncated file) and writes them to the bot's own
``[storage] outputs_dir`` under a name the bot chooses. The path in the event is ignored.
Reading a stored result back (delivery) goes through ``read_result``: a plain name inside
the outputs folder, no symlink, a regular file, checked again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage

from engine.contract import protocol
from engine.contract.config import ArcaeConfig
from engine.fsutil import write_bytes_atomic

# Decoded format -> the suffix the bot stores it under.
ALLOWED_FORMATS = {"PNG": ".png", "JPEG": ".jpg"}
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class ResultRejected(ValueError):
    """A result image failed a check; the message says which (it never quotes the file)."""


@dataclass(frozen=True)
class ResultLimits:
    """How big a result image may be, in bytes and in pixels."""

    max_bytes: int
    max_pixels: int

    @classmethod
    def from_config(cls, config: ArcaeConfig) -> "ResultLimits":
        """The largest image the configured limits can produce: an upscale of the largest request."""
        gen = config.generation
        factor = gen.upscale_factor
        # An upscale rounds each side to a multiple of 8: up to 4 px more per side.
        pixels = int(gen.max_pixels * factor * factor + 8 * factor * gen.max_side + 16)
        return cls(max_bytes=protocol.MAX_RESULT_IMAGE_BYTES, max_pixels=pixels)


def check_image(data: bytes, limits: ResultLimits) -> tuple[str, int, int]:
    """(format, width, height) of a complete PNG/JPEG within ``limits``; else ``ResultRejected``."""
    if len(data) > limits.max_bytes:
        raise ResultRejected(f"{len(data)} bytes; at most {limits.max_bytes} allowed")
    try:
        with PILImage.open(io.BytesIO(data)) as img:  # reads the header only
            fmt, (width, height) = img.format or "", img.size
            if fmt not in ALLOWED_FORMATS:
                raise ResultRejected(f"a {fmt or 'unknown'} file; only PNG or JPEG images are accepted")
            if width * height > limits.max_pixels:
                raise ResultRejected(f"{width}x{height} pixels; at most {limits.max_pixels} allowed")
            img.verify()  # checksums of every chunk (PNG)
        with PILImage.open(io.BytesIO(data)) as img:
            img.load()  # decode every pixel: a truncated file fails here
    except ResultRejected:
        raise
    except Exception as exc:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        raise ResultRejected(f"not a complete PNG or JPEG image ({type(exc).__name__})") from None
    return fmt, width, height


# A step preview (the engine sends at most 128 px a side as JPEG); generous caps, far below a result's.
MAX_PREVIEW_BYTES = 256 << 10
MAX_PREVIEW_B64_CHARS = 4 * ((MAX_PREVIEW_BYTES + 2) // 3)
PREVIEW_LIMITS = ResultLimits(max_bytes=MAX_PREVIEW_BYTES, max_pixels=512 * 512)


def accept_preview(data_b64: str) -> bytes:
    """The bytes of a progress event's preview: valid base64 of a complete, small JPEG; else ``ResultRejected``."""
    if len(data_b64) > MAX_PREVIEW_B64_CHARS:
        raise ResultRejected(f"a preview over {MAX_PREVIEW_BYTES} bytes")
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ResultRejected("the preview is not valid base64") from None
    fmt, _, _ = check_image(data, PREVIEW_LIMITS)
    if fmt != "JPEG":
        raise ResultRejected(f"a {fmt} preview; previews are JPEG only")
    return data


def _decode(image: protocol.ImageResult, limits: ResultLimits) -> bytes:
    if not image.data_b64:
        raise ResultRejected("it carries no image bytes (a path in an event is never read)")
    if len(image.data_b64) > protocol.MAX_RESULT_IMAGE_B64_CHARS:
        raise ResultRejected(f"over {limits.max_bytes} bytes")
    try:
        data = base64.b64decode(image.data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ResultRejected("its bytes are not valid base64") from None
    if image.sha256 and hashlib.sha256(data).hexdigest() != image.sha256.lower():
        raise ResultRejected("its bytes do not match its sha256")
    return data


def accept_completed(event: protocol.Completed, job_id: str, outputs_dir: Path,
                     limits: ResultLimits) -> protocol.Completed:
    """Check every image of ``event`` and store it as ``outputs_dir/<job_id>-<n>.png|jpg``.

    Returns the event with each image's ``path`` set to the stored file and its bytes dropped.
    Raises ``ResultRejected`` (nothing stored) when any image fails a check.
    """
    if not event.images:
        raise ResultRejected("the result has no images")
    if len(event.images) > protocol.MAX_COUNT:
        raise ResultRejected(f"{len(event.images)} images; at most {protocol.MAX_COUNT} allowed")
    checked = []
    for idx, image in enumerate(event.images):
        try:
            data = _decode(image, limits)
            fmt, width, height = check_image(data, limits)
        except ResultRejected as exc:
            raise ResultRejected(f"image {idx + 1}: {exc}") from None
        checked.append((image, data, fmt, width, height))
    images = []
    for idx, (image, data, fmt, width, height) in enumerate(checked):
        # The bot's own name (job ids are the bot's): rename replaces whatever sat there, symlinks too.
        target = outputs_dir / f"{job_id}-{idx}{ALLOWED_FORMATS[fmt]}"
        write_bytes_atomic(target, data)
        images.append(image.model_copy(update={
            "path": str(target), "width": width, "height": height, "data_b64": None,
            "sha256": hashlib.sha256(data).hexdigest()}))
    return event.model_copy(update={"images": images})


def read_result(outputs_dir: Path, stored: str, limits: ResultLimits) -> bytes:
    """The bytes of a stored result: ``outputs_dir/<name of stored>``, no symlink, a checked image."""
    name = Path(stored).name
    if not name or name.startswith("."):
        raise ResultRejected("not a result file name")
    fd = os.open(outputs_dir / name, _OPEN_FLAGS)  # OSError (ELOOP) on a symlink
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ResultRejected("not a regular file")
        if info.st_size > limits.max_bytes:
            raise ResultRejected(f"{info.st_size} bytes; at most {limits.max_bytes} allowed")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limits.max_bytes + 1)
    finally:
        os.close(fd)
    check_image(data, limits)
    return data


def result_suffix(stored: str) -> str:
    """The upload suffix of a stored result (``.png`` or ``.jpg``)."""
    suffix = Path(stored).suffix.lower()
    return suffix if suffix in ALLOWED_FORMATS.values() else ".png"

