"""The drift measurement's generation loop: standard and fast-mode images of fixed prompts and seeds.

``DriftRun`` is steppable like a training run: each ``step()`` makes one image on the engine's
``Generator`` (so from Discord it runs on the GPU worker, between users' jobs), and the last step
compares, scores and writes the report (``training.data.drift_report``: the maths, the scoring rule,
``drift.json`` and ``drift.png``). ``python -m training drift`` steps it to the end in one process.

What is measured: for every prompt and seed, the standard mode (the configured sampler, steps and
CFG) with the adapter mix, then each installed few-step mode with the same mix, at every step count
the mode allows out of ``steps`` and, for LCM-LoRA, at every weight of ``lcm_weights`` (the other
few-step adapters are distilled to run at their configured weight). The images stay in
``OUT/images`` for a person to look at.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from engine.contract.errors import InvalidRequest, JobCanceled
from engine.contract.protocol import AdapterWeight, GenerationParams
from training.data import drift_report as dr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Task:
    """One image to make: the standard mode (``mode`` None) or one fast configuration."""

    prompt: int
    seed: int
    mode: Any = None  # engine.generation.fast_modes.FastChoice
    weight: float = 0.0
    steps: int = 0

    @property
    def key(self) -> tuple:
        return (self.mode.adapter, self.weight, self.steps) if self.mode else ()


def plan_modes(generator: Any, wanted: Sequence[str] = ()) -> list[Any]:
    """The installed few-step modes that fit the base (all of them, or those ``wanted`` names)."""
    from engine.generation.fast_modes import configured_modes

    installed = {a.name for a in generator.registry.list()}
    v_base = generator.model.prediction == "v_prediction"
    modes = [m for m in configured_modes(generator.config.adapters, generator.config.generation)
             if m.adapter in installed and (m.prediction == "v") == v_base]
    if wanted:
        keys = {w.strip().casefold() for w in wanted}
        chosen = [m for m in modes if m.recipe.name in keys or m.adapter.casefold() in keys]
        known = sorted({m.recipe.name for m in modes} | {m.adapter for m in modes})
        missing = keys - {m.recipe.name for m in chosen} - {m.adapter.casefold() for m in chosen}
        if missing:
            raise InvalidRequest(f"fast mode(s) {', '.join(sorted(missing))} not installed for this base; "
                                 f"installed: {', '.join(known) or 'none'}")
        modes = chosen
    if not modes:
        raise InvalidRequest("no few-step adapter is installed for this base: install one (see README "
                             "'Few-step modes') before measuring drift")
    return modes


class DriftRun:
    """One drift measurement on ``generator`` (see the module docstring); call ``step()`` until ``done``."""

    def __init__(
        self, generator: Any, out_dir: Path, *, mix: Sequence[tuple[str, float | None]] = (),
        prompts: Sequence[str] = dr.DEFAULT_PROMPTS, seeds: Sequence[int] = dr.DEFAULT_SEEDS,
        modes: Sequence[str] = (), lcm_weights: Sequence[float] = dr.LCM_WEIGHTS,
        steps: Sequence[int] = dr.STEPS, tag_fn: dr.TagFn | None = None, tagger_name: str = "",
        job_id: str = "drift", attempt: int = 1, record_run: Path | None = None,
        cleanup: Callable[[], None] | None = None, record_extra: dict[str, Any] | None = None,
    ) -> None:
        if not prompts or not seeds:
            raise InvalidRequest("a drift measurement needs at least one prompt and one seed")
        self.generator, self.out_dir = generator, Path(out_dir)
        self.job_id, self.attempt = job_id, attempt
        self.mix = [AdapterWeight(name=n, weight=w) for n, w in mix]
        self.prompts, self.seeds = list(prompts), [int(s) for s in seeds]
        self.tag_fn, self.tagger_name = tag_fn, tagger_name
        self.record_run, self._cleanup = record_run, cleanup  # a training run whose run.json gets the summary
        self.record_extra = dict(record_extra or {})
        generator.resolve(GenerationParams(prompt=self.prompts[0], adapters=self.mix))  # unknown adapters: now
        self.modes = plan_modes(generator, modes)
        self.tasks = [_Task(p, s) for p in range(len(self.prompts)) for s in self.seeds]
        for mode in self.modes:
            weights = list(lcm_weights) if mode.recipe.name == "lcm" else [mode.default_weight]
            low, high = mode.steps
            counts = [n for n in steps if low <= n <= high] or [mode.default_steps]
            self.tasks += [_Task(p, s, mode, float(w), n) for w in weights for n in counts
                           for p in range(len(self.prompts)) for s in self.seeds]
        self.images: dict[tuple, Any] = {}  # (prompt, seed, key) -> PIL image
        self.recalls: dict[tuple, float] = {}
        self.index = 0
        self.status = "pending"
        self.report: dr.DriftReport | None = None
        self._standard: dict[str, Any] = {}
        self._started = time.monotonic()

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "canceled")

    @property
    def total(self) -> int:
        return len(self.tasks) + 1  # the last step scores and writes the report

    def cancel(self) -> None:
        if not self.done:
            self.status = "canceled"
            self._release()

    def _release(self) -> None:
        """Run the cleanup once (e.g. take a measured checkpoint out of the adapter registry)."""
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()

    def step(self) -> tuple[int, int, None]:
        """Make the next image, or (after the last one) score and write the report."""
        if self.status == "canceled":
            raise JobCanceled(f"drift measurement {self.job_id} was canceled")
        if self.done:
            raise InvalidRequest(f"drift measurement {self.job_id} is already {self.status}")
        self.status = "running"
        try:
            if self.index < len(self.tasks):
                self._make(self.tasks[self.index])
            else:
                self._finish()
        except BaseException:
            self.status = "failed"
            self._release()
            raise
        self.index += 1
        return self.index, self.total, None

    def run_all(self) -> dr.DriftReport:
        """Every step in this thread (the CLI)."""
        while not self.done:
            self.step()
        assert self.report is not None
        return self.report

    # ------------------------------------------------------------------ internals
    def _make(self, task: _Task) -> None:
        from PIL import Image

        params = GenerationParams(prompt=self.prompts[task.prompt], seed=task.seed, adapters=self.mix)
        if task.mode is not None:
            params = params.model_copy(update={"fast_mode": task.mode.adapter, "fast_weight": task.weight,
                                               "steps": task.steps})
        gen = self.generator
        saved_dir = gen.outputs_dir
        gen.outputs_dir = self.out_dir / "images"  # kept beside the report, not among users' outputs
        gen.outputs_dir.mkdir(parents=True, exist_ok=True)
        try:
            # A file name under OUT/images (the measurement's job id may already use the 64 characters).
            out = gen.generate(params, job_id=f"drift-{self.index:04d}")
        finally:
            gen.outputs_dir = saved_dir
        if task.mode is None and not self._standard:
            p = out.params
            self._standard = {"sampler": p.sampler, "steps": p.steps, "cfg": p.cfg, "width": p.width, "height": p.height}
        with Image.open(out.images[0].path) as im:
            image = im.convert("RGB")
        where = (task.prompt, task.seed, task.key)
        self.images[where] = image
        if self.tag_fn is not None:
            found = self.tag_fn([image])[0]
            self.recalls[where] = dr.tag_recall(found, dr.prompt_tags(self.prompts[task.prompt]))

    def _finish(self) -> None:
        rows = []
        configs = {t.key: t.mode for t in self.tasks if t.mode is not None}  # in task order
        for key, mode in configs.items():
            _, weight, steps = key
            comparisons = [
                dr.compare(self.images[(p, s, ())], self.images[(p, s, key)],
                           self.recalls.get((p, s, key)), self.recalls.get((p, s, ())))
                for p in range(len(self.prompts)) for s in self.seeds
            ]
            rows.append(dr.summarise(mode.recipe.name, mode.adapter, weight, steps, comparisons))
        model = self.generator.model
        notes = [] if self.tag_fn else ["no tagger: recall not measured, keep = SSIM and colour only"]
        self.report = dr.DriftReport(
            base_model=str(getattr(model, "name", "")), mix=[m.model_dump() for m in self.mix],
            prompts=self.prompts, seeds=self.seeds, standard=self._standard, rows=rows,
            tagger=self.tagger_name, notes=notes,
        )
        dr.write_report(self.out_dir, self.report)
        if self.record_run is not None:
            from training.data.run_record import update_run

            best = self.report.recommended
            update_run(self.record_run, drift={"report_dir": str(self.out_dir), "summary": dr.summary_line(self.report),
                                               "recommended": asdict(best) if best else None, "mix": self.report.mix,
                                               **self.record_extra})
        self.status = "completed"
        self._release()
        log.info("drift measurement %s: %d images in %.1f s; %s", self.job_id, len(self.tasks),
                 time.monotonic() - self._started, dr.summary_line(self.report))

    @property
    def result(self) -> dict[str, Any]:
        """What the engine reports in its ``Completed`` event: the table, the recommendation, the chart."""
        import base64

        out: dict[str, Any] = {"kind": "drift", "status": self.status, "report_dir": str(self.out_dir),
                               "images": len(self.tasks)}
        if self.report is not None:
            best = self.report.recommended
            out.update(
                recommended=asdict(best) if best else None, summary=dr.summary_line(self.report),
                table=dr.format_table(self.report), report=self.report.to_json(),
                chart_png_b64=base64.b64encode((self.out_dir / dr.REPORT_PNG).read_bytes()).decode("ascii"),
            )
        return out


CHECKPOINT_ADAPTER = "arcae-drift-checkpoint"  # the name a measured checkpoint has in the adapter registry


def checkpoint_file(run_dir: Path, step: int | None = None) -> tuple[Path, int]:
    """A training run's checkpoint adapter: ``step``, else the chosen one, else the recommended one."""
    from engine.contract.training_errors import TrainingError
    from training.data.run_record import checkpoint_dir, list_checkpoints, read_run

    try:
        record = read_run(run_dir)
    except TrainingError as exc:
        raise InvalidRequest(str(exc)) from None
    if step is None:
        step = record.get("chosen_checkpoint") or record.get("recommended_checkpoint")
    if step is None:
        raise InvalidRequest(f"run {Path(run_dir).name} has no recommended checkpoint yet: score it first "
                             "(python -m training checkpoints RUN_DIR) or name a step")
    path = checkpoint_dir(run_dir, int(step)) / "adapter.safetensors"
    if not path.is_file():
        steps = [s for s, _ in list_checkpoints(run_dir)]
        raise InvalidRequest(f"run {Path(run_dir).name} has no checkpoint at step {step}; checkpoints: {steps or 'none'}")
    return path, int(step)


def checkpoint_run(generator: Any, run_dir: Path, step: int | None = None, *, out_dir: Path | None = None,
                   mix: Sequence[tuple[str, float | None]] = (), **kwargs: Any) -> DriftRun:
    """A ``DriftRun`` of a training run's checkpoint (at weight 1, plus ``mix``), written to
    ``RUN_DIR/drift`` and summarised in the run's run.json (its run report). Without ``prompts``
    it measures the run's own sample prompts (at most four), the ones its checkpoints were judged by."""
    from training.data.run_record import read_run

    path, step = checkpoint_file(run_dir, step)
    if not kwargs.get("prompts"):
        kwargs["prompts"] = list(read_run(run_dir).get("sample_prompts") or dr.DEFAULT_PROMPTS)[:4]
    registry = generator.registry
    registry.add_file(CHECKPOINT_ADAPTER, path)
    try:
        return DriftRun(generator, out_dir or Path(run_dir) / "drift", mix=[(CHECKPOINT_ADAPTER, 1.0), *mix],
                        record_run=Path(run_dir), record_extra={"checkpoint": step},
                        cleanup=lambda: registry.remove_file(CHECKPOINT_ADAPTER), **kwargs)
    except BaseException:
        registry.remove_file(CHECKPOINT_ADAPTER)
        raise
