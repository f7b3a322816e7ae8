"""Training errors: one base class, grouped subclasses, each with a message meant for a person.

The CLI prints ``str(error)`` as one line (exit 2 for bad input); the engine translates these
into protocol errors where they cross into its API. Imports only the standard library.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base of every error raised by ``training.trainer``, ``checkpoints`` and ``lifecycle``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidTrainingOptions(TrainingError):
    """An option is outside what is allowed (rank 0, zero steps, unknown optimizer ...)."""


class DatasetError(InvalidTrainingOptions):
    """The dataset folder is missing, empty, unreadable, or every caption is empty."""


class OptimizerUnavailable(InvalidTrainingOptions):
    """The requested optimizer needs a package that is not installed."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the run stopped and its last checkpoint is kept."""


class TrainingCanceled(TrainingError):
    """Control flow, not a failure: the run was canceled; nothing live changed."""


class RunNotFound(TrainingError):
    """A run directory, or a checkpoint of it, does not exist."""


class ResumeMismatch(TrainingError):
    """``--resume`` found a run whose options cannot continue with the ones given now."""


class LifecycleError(TrainingError):
    """Promote / rollback / delete could not be done; what is live did not change."""
