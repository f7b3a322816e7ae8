"""What the GPU worker holds per job, and the helpers its loop and its batching share.

Kept apart from ``gpu_worker`` so that ``gpu_batching`` (a mixin of ``GpuWorker``) needs no
import of the class it mixes into.
"""

from __future__ import annotations

import base64
import io
import logging
import sys
import threading
from typing import Any, Protocol

from engine.contract import protocol
from engine.contract.errors import EngineError, InvalidRequest

log = logging.getLogger(__name__)

SENT_PREVIEW_MAX_SIDE = 128  # the step preview sent with progress events (imaging.LATENT_PREVIEW_MAX_SIDE bounds the decode before it)


class SourceNotFound(InvalidRequest):
    """An img2img request names an image the engine does not have."""

    code = "not_found"


class ShuttingDown(EngineError):
    """The engine is stopping and accepts no new work."""

    code = "engine_unavailable"


class SteppableRun(Protocol):
    """A preemptible training run the worker advances one ``step()`` at a time.

    ``step()`` may return ``(step, total, loss)`` to report progress. The worker calls
    ``cancel()`` (on its own thread) when the run is canceled; ``result`` (a dict) goes into
    the ``Completed`` event once ``done`` is true.
    """

    job_id: str
    attempt: int
    done: bool

    def step(self) -> Any: ...

    def cancel(self) -> None: ...


class JobRecord:
    """A job the worker holds (queued or running): its request, cancel flag and event counter."""

    def __init__(self, job_id: str, attempt: int, request: Any = None, run: SteppableRun | None = None) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.request = request
        self.run = run
        self.cancel = threading.Event()
        self.shutdown = False
        self.started = False
        self.seq = 0
        self.position: int | None = None
        self.last_progress = 0.0
        self.last_preview = 0.0


def record_queued(record: JobRecord, position: int, seq: int) -> protocol.Queued:
    return protocol.Queued(job_id=record.job_id, attempt=record.attempt, seq=seq, position=position)


def encode_preview(image: Any) -> str | None:
    """A small base64 JPEG of a PIL image (at most SENT_PREVIEW_MAX_SIDE px), or None if it fails."""
    try:
        thumb = image.convert("RGB")
        thumb.thumbnail((SENT_PREVIEW_MAX_SIDE, SENT_PREVIEW_MAX_SIDE))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=60)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # a preview is optional; never fail a job for it
        log.debug("preview encoding failed", exc_info=True)
        return None


def is_cuda_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def release_cuda_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def vram_in_use() -> dict[str, float]:
    """VRAM in use on the current CUDA device, when torch and CUDA are there."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    used = torch.cuda.memory_allocated() / 2**20
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**20
    return {"vram_used_mb": round(used, 1), "vram_total_mb": round(total, 1)}
