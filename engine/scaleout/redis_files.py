"""Image files through Redis, so that a worker on another host needs no shared disk.

A worker writes its output PNGs on its own disk; the bot's host may not see that disk (a
friend's PC at home). So a worker attaches each output's bytes to its ``Completed`` event
(``P:file:<job>:<attempt>:<name>``, TTL one day; kept out of the events stream so entries stay
small) and the dispatcher puts them back into the event's images (``data_b64``) before it
hands the event on; the bot checks and stores them (``bot.results``). The other
way, the dispatcher attaches an img2img request's source image
(``P:file:<job>:src:<name>``), and the worker stores it in its outputs dir before running the
job (checked against its sha256 where known, written atomically). Imports only the standard
library and ``engine.contract.protocol``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path
from typing import Any

from engine.fsutil import write_bytes_atomic
from engine.contract.protocol import MAX_RESULT_IMAGE_B64_CHARS, MAX_RESULT_IMAGE_BYTES

log = logging.getLogger(__name__)

FILE_TTL_S = 24 * 3600
MAX_FILE_BYTES = 64 << 20


def output_key(prefix: str, job_id: str, attempt: int, name: str) -> str:
    return f"{prefix}:file:{job_id}:{attempt}:{name}"


def source_key(prefix: str, job_id: str, name: str) -> str:
    return f"{prefix}:file:{job_id}:src:{name}"


def encode_file(path: str | Path) -> str:
    """A file's bytes as base64 text (the Redis clients here decode replies as UTF-8)."""
    data = Path(path).read_bytes()
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{Path(path).name} is {len(data)} bytes; at most {MAX_FILE_BYTES} travel through Redis")
    return base64.b64encode(data).decode("ascii")


def decode_file(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def store_file(directory: str | Path, name: str, data: bytes, sha256: str = "") -> Path:
    """Write ``data`` as ``directory/name`` atomically; skip if an identical file is there.

    ``name`` must be a bare file name (no separators); a sha256 mismatch raises ValueError.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"not a plain file name: {name!r}")
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{name}: content does not match its sha256")
    target = Path(directory) / name
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return target  # same host or shared storage: already there
    write_bytes_atomic(target, data)
    return target


async def receive_outputs(client: Any, prefix: str, event: Any) -> Any:
    """Put the output bytes a worker attached to ``event`` (a Completed) back into its images.

    Nothing is written or read on disk here: the bot checks the bytes and stores them itself
    (``bot.results``). An image whose attachment is missing or too large gets no bytes, and the
    bot refuses it; a path in the event is never read. The keys stay until ``discard_outputs``,
    called once the bot has stored the event: a reading whose commit failed is read again.
    """
    images = []
    for image in event.images:
        key = output_key(prefix, event.job_id, event.attempt, Path(image.path).name)
        data = await client.get(key)
        if data is not None and len(data) > MAX_RESULT_IMAGE_B64_CHARS:
            log.warning("output %s of job %s is over %d bytes; refused", key, event.job_id, MAX_RESULT_IMAGE_BYTES)
            data = None
        images.append(image.model_copy(update={"data_b64": data}))
    return event.model_copy(update={"images": images})


async def discard_outputs(client: Any, prefix: str, event: Any) -> None:
    """Delete the output attachments of a Completed the bot has stored (they also expire on their own)."""
    keys = [output_key(prefix, event.job_id, event.attempt, Path(image.path).name) for image in event.images]
    if keys:
        await client.delete(*keys)
