"""Engine errors: one base class, grouped subclasses, each mapped to a protocol error code.

Lower-layer errors (diffusers, peft, torch, OS) are translated into these where they cross
into the engine's public API, so the server can answer every failure with a typed error.
Imports only the standard library.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine reports; ``code`` is a protocol ``ErrorCode``."""

    code = "engine_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(EngineError):
    """A request's values are outside what is allowed; the message says what is."""

    code = "bad_request"


class UnknownAdapter(InvalidRequest):
    """A request named an adapter that is not installed; the message lists the known ones."""

    code = "unknown_adapter"


class IncompatibleAdapter(EngineError):
    """A LoRA file does not fit the base model (wrong architecture, shapes, no LoRA keys, corrupt)."""

    code = "incompatible_adapter"


class ModelMissing(EngineError):
    """The base model cannot be found or downloaded; the message says how to get it."""

    code = "model_missing"


class OutOfMemory(EngineError):
    """The device ran out of memory for this job; memory was released and the engine goes on."""

    code = "out_of_memory"


class QueueFull(EngineError):
    """The engine's queue is at its configured limit."""

    code = "queue_full"


class JobCanceled(EngineError):
    """Control flow, not a failure: raised inside a job to stop it (no VAE decode, no file)."""

    code = "canceled"
