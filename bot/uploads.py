"""A user's picture for /describe and /imagine: training intake's checks, then a clean PNG.

An uploaded picture passes exactly the checks a training upload passes
(``training.data.intake.open_image_checked``: decoded by content as PNG, JPEG, WebP, GIF or BMP
only, pixel cap before decoding, complete data, no truncated PNG, ``[intake] min_side``), plus
``[intake] max_upload_bytes`` on the file itself. What is kept is the decoded pixels re-encoded as
PNG (EXIF orientation applied, alpha on white): nothing else the file carried travels on.

A PNG's generation parameters (A1111's ``parameters`` text, or Arcae's own ``arcae`` request)
are read before that, so /describe can offer "Remix with these parameters".

The engine reads an img2img source from its outputs folder by file name, so the picture is
stored there as ``upload-<random>.png``; in Redis mode the dispatcher attaches it to the job.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import InvalidOption
from engine.contract.config import ArcaeConfig
from engine.contract.infotext_text import INFOTEXT_KEY, REQUEST_KEY, parse_infotext
from engine.fsutil import write_bytes_atomic

if TYPE_CHECKING:
    import discord
    from PIL import Image

UPLOAD_PREFIX = "upload-"
# What a "Remix with these parameters" pre-fills, by A1111's infotext keys.
REMIX_KEYS = ("Prompt", "Negative prompt", "Seed", "Steps", "CFG scale", "Sampler", "Size")


@dataclass(frozen=True)
class Picture:
    """A checked upload: its pixels (RGB) and the generation parameters its PNG carried, if any."""

    image: "Image.Image"
    filename: str
    parameters: dict[str, str] | None


def is_upload(source: str | None) -> bool:
    """Whether a job's source image is a user's picture (img2img mode "image") rather than a result."""
    return bool(source) and Path(source or "").name.startswith(UPLOAD_PREFIX)


def allowed_text(config: ArcaeConfig) -> str:
    """What a picture must be, in one sentence."""
    i = config.intake
    return (f"a PNG, JPEG, WebP, GIF or BMP picture of at most {i.max_upload_bytes / 2**20:.0f} MiB and "
            f"{i.max_image_pixels:,} pixels, at least {i.min_side} px on each side")


async def read_picture(attachment: "discord.Attachment", config: ArcaeConfig) -> Picture:
    """Download and check an attachment (off the event loop); ``InvalidOption`` says what is allowed."""
    check_declared_size(attachment, config)
    data = await attachment.read()
    return await asyncio.to_thread(check_picture, data, attachment.filename[:100], config)


def check_declared_size(attachment: "discord.Attachment", config: ArcaeConfig) -> None:
    """Refuse an attachment whose size Discord declares is over the limit, before anything is downloaded."""
    if attachment.size > config.intake.max_upload_bytes:
        raise InvalidOption(f"`{attachment.filename[:100]}` is {attachment.size / 2**20:.1f} MiB; "
                            f"allowed: {allowed_text(config)}.")


def check_picture(data: bytes, name: str, config: ArcaeConfig) -> Picture:
    """The checked picture in ``data``, or ``InvalidOption`` naming the problem and what is allowed."""
    from training.data.intake import ImageRefused, IntakeLimits, open_image_checked

    if len(data) > config.intake.max_upload_bytes:
        raise InvalidOption(f"`{name}` is {len(data) / 2**20:.1f} MiB; allowed: {allowed_text(config)}.")
    try:
        image = open_image_checked(data, IntakeLimits.from_config(config.intake))
    except ImageRefused as exc:
        raise InvalidOption(f"`{name}` was refused: {exc}. Allowed: {allowed_text(config)}.") from None
    return Picture(image=image, filename=name, parameters=embedded_parameters(data))


def embedded_parameters(data: bytes) -> dict[str, str] | None:
    """A PNG's generation parameters as A1111's infotext keys (``Prompt``, ``Seed``, ...), or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            texts = dict(getattr(im, "text", {}) or {})
    except Exception:  # not a PNG (JPEG, WebP, ...): no text chunks to read
        return None
    text = texts.get(INFOTEXT_KEY)
    if isinstance(text, str) and text.strip():
        parsed = parse_infotext(text[:20_000])
        return {k: parsed[k] for k in REMIX_KEYS if parsed.get(k)} if parsed.get("Prompt") else None
    return _from_request(texts.get(REQUEST_KEY))


def _from_request(raw: Any) -> dict[str, str] | None:
    """Arcae's ``arcae`` chunk (the exact request) in infotext keys, for a PNG without ``parameters``."""
    try:
        request = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        return None
    params = request.get("params") if isinstance(request, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("prompt"), str):
        return None
    out = {"Prompt": params["prompt"], "Negative prompt": params.get("negative_prompt") or "",
           "Seed": params.get("seed"), "Steps": params.get("steps"), "CFG scale": params.get("cfg"),
           "Sampler": params.get("sampler")}
    return {k: str(v) for k, v in out.items() if v not in (None, "")}


def upload_name() -> str:
    """A fresh ``upload-<random>.png`` file name for a user's picture."""
    return f"{UPLOAD_PREFIX}{secrets.token_hex(8)}.png"


def store_picture(picture: Picture, config: ArcaeConfig, *, name: str | None = None) -> str:
    """Write the picture as ``name`` (default a fresh ``upload_name()``) into the outputs folder; return it."""
    buf = io.BytesIO()
    picture.image.save(buf, format="PNG")
    name = name or upload_name()
    if not is_upload(name) or Path(name).name != name:
        raise ValueError(f"not an upload file name: {name!r}")
    outputs = Path(config.path(config.storage.outputs_dir))
    outputs.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(outputs / name, buf.getvalue())
    return name
