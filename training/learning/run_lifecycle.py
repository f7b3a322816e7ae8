"""What every steppable run on the engine's GPU worker shares: its status, cancel, failure, and the resume check.

``TrainingRun`` (LoRA training) and ``DistillRun`` (few-step distillation) subclass
``RunLifecycle``; each provides ``options`` (with ``steps``), ``run_dir``, ``status``,
``release()`` (take its adapter off the shared pipeline) and ``_write_record(**fields)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.contract.training_errors import ResumeMismatch, TrainingError
from training.data.run_record import read_run

TERMINAL = ("completed", "failed", "canceled")


class RunLifecycle(ABC):
    """Status, cancel and failure handling of a steppable run (see the module docstring)."""

    options: Any
    run_dir: Path
    status: str

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def total_steps(self) -> int:
        return self.options.steps

    @abstractmethod
    def release(self) -> None:
        """Take the run's adapter off the shared pipeline (idempotent)."""

    @abstractmethod
    def _write_record(self, **fields: Any) -> None:
        """Update the run's run.json (``status`` among the fields when it changes)."""

    def cancel(self) -> None:
        """Stop now: status canceled, the run's adapter leaves the pipeline; nothing live changes."""
        if self.done:
            return
        self.status = "canceled"
        self._write_record(status="canceled")
        self.release()

    def _fail(self, exc: BaseException) -> None:
        self.status = "failed"
        message = str(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"
        try:
            self._write_record(status="failed", error=message)
        finally:
            self.release()


def existing_run_options(run_dir: Path, resume: bool, what: str) -> dict[str, Any] | None:
    """The saved options of the run in ``run_dir`` (None: a new run); refuses to overwrite one unless resuming."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "run.json").exists():
        return None
    if not resume:
        raise TrainingError(f"{run_dir} already holds a {what}; pass --resume or choose another --out")
    return read_run(run_dir).get("options", {})


def check_same_options(run_dir: Path, old: dict[str, Any], new: dict[str, Any], resumable: Iterable[str]) -> None:
    """Refuse to resume when an option that shapes the run differs from the saved one."""
    allowed = set(resumable)
    changed = sorted(k for k in new if k not in allowed and old.get(k) != new[k])
    if changed:
        raise ResumeMismatch(f"cannot resume {run_dir}: option(s) {', '.join(changed)} differ from the saved run")
