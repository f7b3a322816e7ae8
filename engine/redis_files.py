"""Image files through Redis, so that a worker on another host needs no shared disk.

A worker writes its output PNGs on its own disk; the bot's host may not see that disk (a
friend's PC at home). So a worker attaches each output's bytes to its ``Completed`` event
(``P:file:<job>:<attempt>:<name>``, TTL one day) and the dispatcher stores them in the bot's
``[storage] outputs_dir`` before it hands the event on, with the local path in it. The other
way, the dispatcher attaches an img2img request's source image
(``P:file:<job>:src:<name>``), and the worker stores it in its outputs dir before running the
job. Files are checked against their sha256 where the event carries one and written
atomically (temp file, fsync, rename). Imports only the standard library.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from pathlib import Path
from typing import Any

from engine.fsutil import write_bytes_atomic

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


async def receive_outputs(client: Any, prefix: str, outputs_dir: Path, event: Any) -> Any:
    """Store the output files a worker attached to ``event`` (a Completed) in ``outputs_dir``.

    Returns the event with each image's path pointing at the local copy. Images without an
    attachment (shared disk, same host) keep their path.
    """
    images = []
    for image in event.images:
        name = Path(image.path).name
        key = output_key(prefix, event.job_id, event.attempt, name)
        data = await client.get(key)
        local = Path(outputs_dir) / name
        if data is None and name and not name.startswith(".") and local.is_file():
            # Stored by an earlier reading of this event whose bot-side commit failed (the event
            # stayed unacknowledged and is read again): the local copy is the one to use.
            images.append(image.model_copy(update={"path": str(local)}))
            continue
        if data is None:
            images.append(image)
            continue
        try:
            path = await asyncio.to_thread(store_file, outputs_dir, name, decode_file(data), image.sha256)
            images.append(image.model_copy(update={"path": str(path)}))
        except (OSError, ValueError) as exc:
            log.error("cannot store output %s of job %s: %s", name, event.job_id, exc)
            images.append(image)
        await client.delete(key)
    return event.model_copy(update={"images": images})
