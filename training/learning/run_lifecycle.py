"""What every steppable run on the engine's GPU worker shares: its status, cancel, failure, and the resume check.

``TrainingRun`` (LoRA training) and ``DistillRun`` (few-step distillation) subclass
``RunLifecycle``, which steps them (``step()``: status, loss log, checkpoints, finish, and what a
failure or Ctrl-C does); each provides ``options`` (with ``steps`` and ``save_every``), ``run_dir``,
``_optimizer_step()``, ``checkpoint()``, ``_finish()``, ``release()`` (take its adapter off the
shared pipeline) and ``_write_record(**fields)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from engine.contract.training_errors import ResumeMismatch, TrainingCanceled, TrainingError
from training.data import checkpoints as ckpt
from training.data.run_record import read_run

TERMINAL = ("completed", "failed", "canceled")


class _StepTuple(NamedTuple):
    step: int
    total: int
    loss: float


class StepResult(_StepTuple):
    """One optimizer step: steps done, total steps, mean loss; ``lr`` and ``checkpoint`` besides.

    A 3-tuple (step, total, loss), the shape ``engine.service.gpu_worker`` reads progress from.
    """

    lr: float
    checkpoint: Path | None

    def __new__(cls, step: int, total: int, loss: float, lr: float = 0.0, checkpoint: Path | None = None):
        self = super().__new__(cls, step, total, loss)
        self.lr = lr
        self.checkpoint = checkpoint
        return self


class RunLifecycle(ABC):
    """Status, cancel and failure handling of a steppable run (see the module docstring)."""

    options: Any
    run_dir: Path
    status: str
    step_index: int
    last_loss: float | None
    what = "run"  # how messages name it ("training run", "distillation run")

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def total_steps(self) -> int:
        return self.options.steps

    def step(self) -> StepResult:
        """One optimizer step; checkpoint when due (``save_every``), finish after the last step."""
        if self.status == "canceled":
            raise TrainingCanceled(f"{self.what} {self.run_dir.name} was canceled")
        if self.done:
            raise TrainingError(f"{self.what} {self.run_dir.name} is already {self.status}")
        try:
            if self.status == "pending":
                self._begin()
                self._write_record(status="running")
            loss, lr = self._optimizer_step()
            self.step_index += 1
            self.last_loss = loss
            ckpt.append_loss(self.run_dir, self.step_index, loss, lr)
            saved = None
            finished = self.step_index >= self.options.steps
            if finished or self.step_index % self.options.save_every == 0:
                saved = self.checkpoint()
            if finished:
                self._finish()
            return StepResult(self.step_index, self.options.steps, loss, lr, saved)
        except TrainingCanceled:
            raise
        except KeyboardInterrupt:  # Ctrl-C in the CLI: a cancel, not a failure
            self.cancel()
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    def _begin(self) -> None:
        """Before the first step of this process (a new run, or a resumed one)."""

    @abstractmethod
    def _optimizer_step(self) -> tuple[float, float]:
        """One optimizer step: (loss, learning rate)."""

    @abstractmethod
    def checkpoint(self) -> Path:
        """Save the run's state for the current step."""

    @abstractmethod
    def _finish(self) -> None:
        """After the last step: the final adapter, the report, status completed."""

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
