"""PNG metadata: the AUTOMATIC1111 ``parameters`` text and Arcae's own request JSON.

The ``parameters`` chunk is written exactly the way A1111's ``create_infotext`` writes it, so
A1111 ("PNG Info"), Civitai and prompt readers show a generated image's settings::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 28, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 1, Size: 832x1216, ...

Values containing ``,`` ``:`` or a newline are JSON-quoted (A1111's ``quote``); ``parse_infotext``
reads the text back with A1111's ``parse_generation_parameters`` rules. The ``arcae`` chunk holds
the full resolved request as JSON so that Arcae can re-run an image exactly (variations, upscale).

Hashes follow A1111: the model hash is the first 10 hex digits of the checkpoint's sha256; a
LoRA's is the first 12 hex digits of the kohya/"addnet" hash (sha256 of the safetensors file
after its JSON header, so metadata edits do not change it).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

# The parser is torch-free and lives in the contract, so the bot can read an uploaded PNG's parameters.
from engine.contract.infotext_text import (INFOTEXT_KEY, REQUEST_KEY, parse_infotext, parse_lora_hashes,  # noqa: F401
                                           unquote)
from engine.fsutil import write_bytes_atomic


@functools.cache  # importlib.metadata scans site-packages (~1 ms); called twice per image
def arcae_version() -> str:
    """"arcae-<version>" as written into the infotext's ``Version`` field."""
    try:
        from importlib.metadata import version

        return f"arcae-{version('arcae')}"
    except Exception:  # not installed (running from a source tree)
        return "arcae-0.1.0"


def format_number(value: float | int) -> str:
    """A1111-style numbers: ``6.0`` is written ``6``, ``6.5`` stays ``6.5``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(value: Any) -> str:
    """A1111's ``quote``: JSON-quote a value that contains ``,`` ``:`` or a newline."""
    text = format_number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def lora_prompt_tags(adapters: list[tuple[str, float]]) -> str:
    """A1111 prompt tags for a LoRA mix (``<lora:name:0.8>``), so A1111 re-runs the same mix."""
    return " ".join(f"<lora:{name}:{format_number(float(weight))}>" for name, weight in adapters)


def build_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value, ...``.

    ``fields`` keeps its order (pass A1111's: Steps, Sampler, Schedule type, CFG scale, Seed,
    Size, Model hash, Model, Denoising strength, Lora hashes, ..., Version); None values are
    left out, as A1111 does.
    """
    params_line = ", ".join(
        key if key == value else f"{key}: {quote(value)}" for key, value in fields.items() if value is not None
    )
    negative_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_text}\n{params_line}".strip()


def generation_fields(
    *,
    steps: int,
    sampler: str,
    schedule_type: str,
    cfg: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None,
    model_name: str | None,
    lora_hashes: Mapping[str, str] | None = None,
    denoising_strength: float | None = None,
    hires_upscale: float | None = None,
    version: str | None = None,
    cfg_rescale: float = 0.0,
    zero_terminal_snr: bool = False,
    fast_mode: str | None = None,
    fast_adapter: str | None = None,
) -> dict[str, Any]:
    """The parameters line's fields in A1111's order (``create_infotext``).

    A v-prediction base is recorded as Forge does (``Noise Schedule: Zero Terminal SNR``) with
    the CFG rescale extension's ``CFG Rescale phi``; a few-step mode as ``Fast mode`` (its
    adapter is in ``Lora hashes``, its scheduler in ``Sampler``/``Schedule type``).
    """
    return {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": float(cfg),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash or None,
        "Model": model_name or None,
        "Denoising strength": denoising_strength,
        "Hires upscale": hires_upscale,
        "Noise Schedule": "Zero Terminal SNR" if zero_terminal_snr else None,
        "CFG Rescale phi": float(cfg_rescale) if cfg_rescale else None,
        "Fast mode": fast_mode or None,
        # A few-step adapter distilled for the request's own mix (``python -m training distill-fast``).
        "Fast adapter": f"{fast_adapter} (distilled for this mix)" if fast_adapter else None,
        "Lora hashes": ", ".join(f"{n}: {h}" for n, h in lora_hashes.items()) if lora_hashes else None,
        "Version": version or arcae_version(),
    }


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """kohya-ss/A1111 "addnet" hash of a LoRA file: sha256 of the data after the safetensors header.

    A1111 shows the first 12 hex digits as the LoRA's short hash in ``Lora hashes``.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_png_atomic(
    path: str | os.PathLike[str],
    image: Any,
    infotext: str,
    request_json: Mapping[str, Any] | str,
    *,
    compress_level: int = 6,
) -> str:
    """Write ``image`` as a PNG with both metadata chunks, atomically; return the file's sha256.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, then
    renamed over ``path``: a reader sees either no file or the whole file, never half of one.
    """
    data = encode_png(image, infotext, request_json, compress_level=compress_level)
    write_bytes_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def encode_png(image: Any, infotext: str, request_json: Mapping[str, Any] | str, *, compress_level: int = 6) -> bytes:
    """The PNG bytes of ``image`` with the A1111 ``parameters`` text and the Arcae request chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(INFOTEXT_KEY, infotext)  # tEXt, or iTXt when not latin-1 (as A1111 does)
    request_text = request_json if isinstance(request_json, str) else json.dumps(request_json, ensure_ascii=False)
    info.add_itxt(REQUEST_KEY, request_text, zip=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def read_png_metadata(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any] | None]:
    """The ``parameters`` text and the decoded ``arcae`` request JSON of a PNG (None when absent)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        texts = dict(getattr(image, "text", {}) or {})
    request = texts.get(REQUEST_KEY)
    try:
        decoded = json.loads(request) if request else None
    except json.JSONDecodeError:
        decoded = None
    return texts.get(INFOTEXT_KEY), decoded if isinstance(decoded, dict) else None
