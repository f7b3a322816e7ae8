"""An in-process ``GpuWorker`` started with an event recorder, and waiting for what it emits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from engine.contract import protocol


def start_recording(gpu: Any) -> Any:
    """Start ``gpu`` with an emitter that records its events (``gpu.events``, signalled on ``gpu.arrived``)."""
    events: list = []
    arrived = threading.Condition()

    def emit(event: Any) -> None:
        with arrived:
            events.append(event)
            arrived.notify_all()

    gpu.events, gpu.arrived = events, arrived
    gpu.start(emit)
    return gpu


def wait_for(gpu: Any, test: Callable[[list], Any], timeout: float = 180) -> Any:
    """``test(gpu.events)`` once it is true (fails the test after ``timeout`` seconds)."""
    with gpu.arrived:
        assert gpu.arrived.wait_for(lambda: test(gpu.events), timeout), "no such event in time"
    return test(gpu.events)


def final_event(gpu: Any, job_id: str, attempt: int | None = None, timeout: float = 180) -> Any:
    """The terminal event (Completed, Failed or Canceled) of ``job_id`` (of ``attempt`` when given)."""
    return wait_for(gpu, lambda ev: [e for e in ev if e.job_id == job_id and attempt in (None, e.attempt)
                                     and isinstance(e, protocol.TERMINAL_EVENT_TYPES)], timeout)[0]
