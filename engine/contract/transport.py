"""The one transport interface the bot talks to, and its errors (websocket link and Redis dispatcher alike).

``bot.engine_link.EngineLink`` (one engine over a websocket) and
``engine.scaleout.dispatcher.Dispatcher`` (engine workers behind Redis Streams) both implement
``EngineTransport``; the bot's ``JobManager`` holds one and never needs to know which. Both
raise only ``EngineUnavailable`` and ``EngineRejected`` across this interface, so the bot
catches one set of exceptions whatever the mode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from engine.contract import protocol

EventCallback = Callable[[Any], Awaitable[None]]
ConnectCallback = Callable[[], Awaitable[None]]
JobRequest = (protocol.GenerateRequest | protocol.Img2ImgRequest | protocol.TrainRequest | protocol.DriftRequest
              | protocol.DistillRequest)


class TransportError(Exception):
    """Base of the errors a transport raises to the bot."""


class EngineUnavailable(TransportError):
    """The engine cannot be reached now (starting, restarting, connection lost, no answer)."""


class EngineRejected(TransportError):
    """The engine refused a request; ``code`` is a protocol ``ErrorCode``, ``message`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@runtime_checkable
class EngineTransport(Protocol):
    """What the bot may ask of the engine, whichever way it is reached."""

    @property
    def connected(self) -> bool:
        """True while requests can reach an engine."""
        ...

    async def start(self) -> None:
        """Connect (and keep reconnecting in the background); events then go to the callback."""

    async def close(self) -> None:
        """Stop for good; pending requests fail with ``EngineUnavailable``."""

    async def submit(self, request: JobRequest) -> protocol.Queued:
        """Hand over a job; answered with its place in the queue."""
        ...

    async def cancel(self, job_id: str) -> bool:
        """Ask for a job to stop; False when no engine holds it."""
        ...

    async def list_adapters(self) -> list[protocol.AdapterInfo]:
        """The adapters an engine can load."""
        ...

    async def status(self) -> protocol.EngineStatus:
        """Queue and device state, for /status."""
        ...

    async def reload_adapters(self) -> dict[str, Any]:
        """Rescan the adapters directory; a summary of what changed."""
        ...
