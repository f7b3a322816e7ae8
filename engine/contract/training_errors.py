"""Training errors: one base class, grouped subclasses, each with a message meant for a person.

The CLI prints ``str(error)`` as one line (exit 2 for bad input). They are ``EngineError``s with
a protocol ``code``, so the engine's GPU worker reports a failed run with its real message, and
``TrainingCanceled`` is a ``JobCanceled`` (control flow). Imports only the standard library and
``engine.contract.errors`` (itself standard library only).
"""

from __future__ import annotations

from engine.contract.errors import EngineError, JobCanceled


class TrainingError(EngineError):
    """Base of every error raised by ``training.learning.trainer``, ``checkpoints`` and ``lifecycle``."""

    code = "engine_error"


class InvalidTrainingOptions(TrainingError):
    """An option is outside what is allowed (rank 0, zero steps, unknown optimizer ...)."""

    code = "bad_request"


class DatasetError(InvalidTrainingOptions):
    """The dataset folder is missing, empty, unreadable, or every caption is empty."""


class OptimizerUnavailable(InvalidTrainingOptions):
    """The requested optimizer needs a package that is not installed."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the run stopped and its last checkpoint is kept."""


class DiskSpaceLow(TrainingError):
    """Less free disk than ``[training] min_free_disk_mb`` (plus a checkpoint's size) where a run writes."""


class TrainingCanceled(TrainingError, JobCanceled):
    """Control flow, not a failure: the run was canceled; nothing live changed."""

    code = "canceled"


class RunNotFound(TrainingError):
    """A run directory, or a checkpoint of it, does not exist."""

    code = "not_found"


class ResumeMismatch(InvalidTrainingOptions):
    """``--resume`` found a run whose options cannot continue with the ones given now."""


class LifecycleError(TrainingError):
    """Promote / rollback / delete could not be done; what is live did not change."""

    code = "bad_request"
