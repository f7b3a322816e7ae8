"""Build a ``DistillRun`` for a ``DistillRequest`` on the pipeline and adapter registry a worker already holds.

The run (``training.learning.distill``) trains a few-step student LoRA for one adapter mix on the
worker's own pipeline (teacher and student share the one copy of the base), in the training slot:
one optimizer step between generation jobs. It lives in ``[storage] runs_dir / <job_id>``; a later
attempt, or a run folder that already exists, resumes from its newest checkpoint. The student starts
from the installed stock few-step adapter (``[adapters] lcm_adapter``) when its file is there.

When the run completes, ``DistillJob`` installs the adapter into the adapters directory and
reloads the registry, so ``fast`` with that mix runs it without a restart: only when the run's
judge recommends it, unless the request says ``install: always`` (or ``never``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from engine.contract import protocol
from engine.contract.config import ArcaeConfig
from engine.contract.errors import InvalidRequest

log = logging.getLogger(__name__)

# DistillSettings fields passed through to DistillOptions unchanged when set.
_PASS_THROUGH = ("steps", "teacher_cfg", "teacher_steps", "student_steps", "lr", "rank", "save_every", "seed", "init")


def distill_factory(config: ArcaeConfig, generator: Any) -> Callable[[protocol.DistillRequest], Any]:
    """A ``GpuWorker.distill_factory``: ``DistillRequest`` -> a steppable ``DistillJob``."""

    def make_run(request: protocol.DistillRequest) -> Any:
        from engine.contract.training_errors import TrainingError
        from training.data.distill_setup import DistillOptions
        from training.learning.distill import DistillRun

        o = request.options
        registry = generator.registry
        mix = tuple(registry.resolve_mix(o.mix))  # unknown names and bad weights answer before any step
        given = {k: getattr(o, k) for k in _PASS_THROUGH if getattr(o, k) is not None}
        given["resolution"] = o.resolution or config.training.resolution
        adapters_dir = Path(config.path(config.adapters.dir))
        run_dir = Path(config.path(config.storage.runs_dir)) / request.job_id
        try:
            options = DistillOptions(name=o.name, mix=mix, captions=tuple(_captions(config, o, mix)), **given)
            run = DistillRun(generator.pipe, options, run_dir, mixer=registry, stock=_stock(config, adapters_dir),
                             resume=request.attempt > 1 or run_dir.exists(),
                             base_model=getattr(generator.model, "name", ""), job_id=request.job_id)
        except TrainingError as exc:
            raise InvalidRequest(str(exc)) from None
        return DistillJob(run, request, adapters_dir, registry)

    return make_run


def _captions(config: ArcaeConfig, o: protocol.DistillSettings, mix: tuple[tuple[str, float], ...]) -> list[str]:
    """The request's captions, else its dataset's, else those of the datasets named after the mix's adapters."""
    from engine.contract.training_errors import TrainingError
    from training.data.distill_setup import dataset_captions

    if o.captions:
        return list(o.captions)
    root = Path(config.path(config.storage.datasets_dir))
    if o.dataset:
        if not (root / o.dataset).is_dir():
            raise InvalidRequest(f"no dataset {o.dataset!r} on the engine; " + _known(root))
        folders = [root / o.dataset]
    else:
        folders = [root / name for name, _ in mix if (root / name).is_dir()]
        if not folders:
            raise InvalidRequest("give a dataset (or captions): no dataset is named after the mix's adapters; "
                                 + _known(root))
    try:
        return [c for folder in folders for c in dataset_captions(folder)]
    except TrainingError as exc:
        raise InvalidRequest(str(exc)) from None


def _known(root: Path) -> str:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    return f"datasets: {', '.join(names[:20]) or 'none'}"


def _stock(config: ArcaeConfig, adapters_dir: Path) -> Path | None:
    """The installed stock few-step adapter's file (the student's starting point), if there is one."""
    name = config.adapters.lcm_adapter
    path = adapters_dir / f"{name}.safetensors"
    return path if name and path.is_file() else None


class DistillJob:
    """A ``DistillRun`` as the GPU worker steps it, installing its adapter when it completes."""

    def __init__(self, run: Any, request: protocol.DistillRequest, adapters_dir: Path, registry: Any) -> None:
        self.run, self.adapters_dir, self.registry = run, adapters_dir, registry
        self.job_id, self.attempt = request.job_id, request.attempt
        self.install_when = request.options.install
        self.installed: str | None = None

    @property
    def done(self) -> bool:
        return self.run.done

    def step(self) -> Any:
        result = self.run.step()  # (step, total, loss): the worker's progress event
        if self.run.status == "completed":
            self._install()
        return result

    def cancel(self) -> None:
        self.run.cancel()

    def release(self) -> None:
        self.run.release()

    def _recommended(self) -> bool | None:
        """The run's judge: closer to the teacher than before and than the stock adapter (None: not judged)."""
        return self.run.report.recommended

    def _install(self) -> None:
        recommended = self._recommended()
        if self.install_when == "always" or (self.install_when == "recommended" and recommended):
            path = self.run.install(self.adapters_dir)
            # Live without a restart: we are on the worker thread, between generation jobs.
            self.registry.reload()
            self.installed = path.stem
            log.info("distilled adapter %s installed (%s)", path.stem, self.job_id)

    @property
    def result(self) -> dict[str, Any]:
        """The run's numbers, its report (the judge's verdict) and the installed adapter's name, if any."""
        from training.data.run_record import read_run

        out = dict(self.run.result)
        try:
            report = read_run(self.run.run_dir).get("report") or {}
        except Exception:  # an unreadable record: the run's own numbers still go back
            report = {}
        out.update(report=report, recommended=self._recommended() if self.run.status == "completed" else None,
                   installed=self.installed, name=self.run.options.name,
                   mix=[[n, w] for n, w in self.run.options.mix], install=self.install_when)
        return out
