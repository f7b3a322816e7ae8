"""Training runs from Discord, without Discord: datasets, options, the engine, scores, notices.

The flow of one run (``/train start``):

1. the bot downloads the attachments (sizes checked against ``[intake]`` first);
2. ``training.data.dataset_folder`` checks every file by content, captions the images with the WD tagger
   (onnxruntime, in a worker thread: the event loop never waits on it) and makes the dataset
   ``<datasets_dir>/<adapter name>`` visible in one rename;
3. the run is recorded in SQLite (``training_runs``) and a ``TrainRequest`` goes to the engine,
   whose GPU worker runs it as preemptible steps between generation jobs;
4. engine events update the row (progress, loss); ``Completed`` makes the bot score every
   checkpoint (``training.data.checkpoints.score_run``: tagger recall of the dataset's signature tags
   against collapse) and tell the admin which checkpoint it recommends.

Promotion (``/adapter promote``) is a separate, explicit step, so a failed or canceled run
never changes what is live. The bot never imports torch: ``training.data.dataset_folder``,
``training.data.checkpoints`` and ``training.data.lifecycle`` are torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bot.db_retry import until_stored
from bot.distill_flow import DISTILL_KIND, request_for
from bot.errors import InvalidOption, Refused
from bot.i18n import _
from bot.training_store import RunRow, TrainingStore
from engine.contract import protocol

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # a run the engine stopped under twice is not tried a third time
# Options an admin may set from Discord; everything else comes from [training] in config.toml.
DISCORD_OPTIONS = ("steps", "rank", "lr", "resolution", "save_every", "seed", "sample_steps", "optimizer")
Notice = Callable[[RunRow, str], Any]


def discord_wording(message: str) -> str:
    """The trainer names options as CLI flags (``--save-every``); Discord shows ``save_every``."""
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


class TrainingFlow:
    """One per bot: shared by the /train and /adapter cogs (see the module docstring)."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot
        self.config = bot.config
        self.store = TrainingStore(bot.db)
        self.notice: Notice | None = None  # set by the /train cog: tells the admin a run ended
        # Set by the /train cog: a run's row changed (its live status message follows it).
        self.on_change: Callable[[str], Any] | None = None
        self._tagger: Any = None
        self._tagger_lock = asyncio.Lock()
        self._active: set[str] = set()
        self._completing: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ places

    @property
    def datasets_dir(self) -> Path:
        return Path(self.config.path(self.config.storage.datasets_dir))

    @property
    def runs_dir(self) -> Path:
        return Path(self.config.path(self.config.storage.runs_dir))

    @property
    def adapters_dir(self) -> Path:
        return Path(self.config.path(self.config.adapters.dir))

    def run_dir(self, run: RunRow) -> Path:
        return Path(run.run_dir) if run.run_dir else self.runs_dir / run.run_id

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        """Remember the active runs; follow engine events and reconnects (to resubmit the runs)."""
        self._active = {r.run_id for r in await self.store.active()}
        self.bot.jobs.add_listener(self.on_event)
        self.bot.jobs.add_connect_listener(self.resubmit_active)

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()

    def spawn(self, coro: Any) -> None:
        async def logged() -> None:
            try:
                await coro
            except Exception:
                log.exception("training background work failed")

        task = asyncio.create_task(logged())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ tagger and datasets

    async def tagger(self) -> Any:
        """The WD tagger (loaded once, in a thread: onnxruntime session start takes seconds)."""
        async with self._tagger_lock:
            if self._tagger is None:
                from training.data.tagger import WDTagger

                self._tagger = await asyncio.to_thread(WDTagger.from_config, self.config.tagger,
                                                       base_dir=self.config.base_dir)
            return self._tagger

    async def _tagger_or_refuse(self) -> Any:
        try:
            return await self.tagger()
        except Exception as exc:  # a missing or broken model: say which, keep the bot up
            log.warning("the WD tagger could not be loaded: %s", exc)
            raise Refused(_("Captioning is unavailable: the WD tagger `%(model)s` could not be loaded (%(error)s). "
                            "Check [tagger] model in config.toml.", model=self.config.tagger.model,
                            error=str(exc)[:300])) from None

    async def import_images(self, name: str, kind: str, trigger: str, files: list[tuple[str, bytes]],
                            *, replace: bool = False) -> Any:
        """Intake + captions into ``datasets_dir/name`` (atomic); ``Refused`` says why nothing was kept."""
        from training.data.dataset_folder import import_with_config
        from training.data.intake import IntakeRefused

        tagger = await self._tagger_or_refuse()
        try:
            return await asyncio.to_thread(import_with_config, self.config, files, name=name, kind=kind,
                                           trigger=trigger, tagger=tagger, replace=replace)
        except IntakeRefused as exc:
            raise Refused(_("No images imported: %(reason)s", reason=exc.reason)) from None

    async def add_images(self, name: str, kind: str, trigger: str, files: list[tuple[str, bytes]]) -> Any:
        """Append new images to dataset ``name``: only they pass intake and count against the caps;
        the dataset's own images are kept byte for byte. ``Refused`` says why nothing changed."""
        from training.data.captions import CaptionRecipe
        from training.data.dataset_add import add_images
        from training.data.intake import IntakeLimits, IntakeRefused

        tagger = await self._tagger_or_refuse()
        try:
            return await asyncio.to_thread(
                add_images, files, name=name, datasets_dir=self.datasets_dir, tagger=tagger,
                recipe=CaptionRecipe.from_config(self.config.tagger, kind, trigger=trigger),
                limits=IntakeLimits.from_config(self.config.intake))
        except IntakeRefused as exc:
            raise Refused(_("No images added: %(reason)s", reason=exc.reason)) from None

    def datasets(self) -> list[str]:
        from training.data.dataset_folder import list_datasets

        return list_datasets(self.datasets_dir)

    async def dataset_choices(self, current: str) -> list[Any]:
        """Autocomplete choices: the datasets whose names contain ``current`` (at most Discord's 25)."""
        from discord import app_commands

        names = await asyncio.to_thread(self.datasets)
        return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]

    # ------------------------------------------------------------------ options

    def build_options(self, *, dataset: Path, kind: str, trigger: str, **overrides: Any) -> dict[str, Any]:
        """The ``TrainRequest.options``, validated here exactly as the engine will validate them."""
        from engine.contract.training_errors import TrainingError
        from engine.contract.training_options import from_config

        given = {k: v for k, v in overrides.items() if k in DISCORD_OPTIONS and v is not None}
        options = {"dataset": str(dataset), "kind": kind, "trigger": trigger, **given}
        try:
            from_config(self.config.training, **options)
        except TrainingError as exc:
            raise InvalidOption(_("Not started: %(reason)s.", reason=discord_wording(exc.message))) from None
        return options

    # ------------------------------------------------------------------ engine

    def _engine(self) -> Any:
        return self.bot.jobs.engine if self.bot.jobs is not None else None

    async def submit(self, run: RunRow) -> None:
        """Send the run to the engine; ``EngineUnavailable``/``EngineRejected`` propagate."""
        from engine.contract.transport import EngineUnavailable

        self._active.add(run.run_id)  # from now on a reconnect (resubmit_active) sends it if this call cannot
        engine = self._engine()
        if engine is None:
            raise EngineUnavailable("the engine is not connected yet")
        log.info("training run %s (%s) sent to the engine, attempt %d", run.run_id, run.adapter_name, run.attempt)
        if run.kind == DISTILL_KIND:  # a distillation run (/adapter distill-fast) shares this lifecycle
            await engine.submit(request_for(run))
            return
        await engine.submit(protocol.TrainRequest(job_id=run.run_id, owner=str(run.created_by),
                                                  attempt=run.attempt, options=run.options))

    async def cancel(self, run: RunRow) -> bool:
        """Stop a run; True when the engine held it (its Canceled event finishes the row)."""
        from engine.contract.transport import EngineUnavailable

        engine = self._engine()
        held = False
        if engine is not None:
            try:
                held = await engine.cancel(run.run_id)
            except EngineUnavailable:
                held = False
        if not held:
            await self._finished(run.run_id, "canceled")
        return held

    async def reload_adapters(self) -> dict[str, Any]:
        """Ask the engine to rescan its adapters between jobs, then refresh the bot's catalog."""
        engine = self._engine()
        result: dict[str, Any] = {}
        if engine is not None:
            result = await engine.reload_adapters()
        await self.bot.catalog.refresh()
        return result

    async def resubmit_active(self) -> None:
        """After each (re)connection, resubmit active runs: idempotent for a run the engine holds,
        a resume from the newest checkpoint for one a restarted engine lost."""
        for run in await self.store.active():
            if run.run_id not in self._active:
                continue  # still being prepared by /train start, which sends it itself
            try:
                # Same attempt: an engine that still holds the run answers idempotently and its
                # events keep their attempt; a restarted engine resumes it from its newest
                # checkpoint and numbers events from 0 again, hence the sequence reset.
                await self.store.set_attempt(run.run_id, run.attempt)
                await self.submit(run)
            except Exception as exc:
                log.info("training run %s not resubmitted: %s", run.run_id, exc)

    # ------------------------------------------------------------------ engine events

    async def on_event(self, event: Any) -> None:
        """Apply one engine event if it belongs to a training run (others are ignored cheaply)."""
        if not isinstance(event, protocol.JOB_EVENT_TYPES) or event.job_id not in self._active:
            return
        try:  # a failed write (locked, disk full) is retried, never dropped
            await until_stored(f"{type(event).__name__} of training run {event.job_id}", lambda: self._apply(event))
        except Exception:
            log.exception("applying %s to training run %s failed", type(event).__name__, event.job_id)

    async def _apply(self, event: Any) -> None:
        run = await self.store.get(event.job_id)
        if run is None or not run.active or event.attempt < run.attempt:
            return
        if isinstance(event, protocol.Started):
            if await self.store.count_start(run.run_id, event.attempt, event.seq) > MAX_ATTEMPTS:
                await self._stop_crashing(run)
                return
            await self.store.mark_started(run.run_id, event.attempt, event.seq)
            self.changed(run.run_id)
        elif isinstance(event, protocol.Progress):
            if await self.store.record_progress(run.run_id, event.attempt, event.seq, event.step, event.total,
                                                event.loss):
                self.changed(run.run_id)
        elif isinstance(event, protocol.Completed):
            # Scoring tags every checkpoint's samples: off the event path, so that generation
            # events keep flowing meanwhile; once per run even if the event comes twice.
            if run.run_id not in self._completing:
                self._completing.add(run.run_id)
                self.spawn(self._completed(run, event))
        elif isinstance(event, protocol.Failed):
            if event.retryable and event.error == "engine_unavailable" and run.attempt < MAX_ATTEMPTS:
                # The engine stopped under the run: the next attempt resumes from its last checkpoint.
                await self.store.set_attempt(run.run_id, run.attempt + 1)
                retry = await self.store.get(run.run_id)
                if retry is not None:
                    self.spawn(self.submit(retry))
                return
            await self._finished(run.run_id, "failed", error=discord_wording(event.message))
        elif isinstance(event, protocol.Canceled):
            await self._finished(run.run_id, "canceled")

    def changed(self, run_id: str) -> None:
        """Tell the watcher (the live status message) that a run's row changed."""
        if self.on_change is not None:
            self.on_change(run_id)

    async def _stop_crashing(self, run: RunRow) -> None:
        """A run started more often than allowed: each earlier start ended with the engine stopping
        under it (a crash, or a kill for memory). Stop it here, record it as failed, tell the admin."""
        await self._finished(run.run_id, "failed",
                             error=f"the engine stopped {MAX_ATTEMPTS} times while training this run, so it "
                                   "was not tried again (check the engine log for an out-of-memory kill or crash; "
                                   "lower the resolution, rank or batch size and start it again)")
        engine = self._engine()
        try:  # its Canceled event is ignored: the run is no longer active
            if engine is not None:
                await engine.cancel(run.run_id)
        except Exception as exc:  # the engine may be going down again: the run is failed here anyway
            log.warning("canceling training run %s on the engine failed: %s", run.run_id, exc)

    async def _completed(self, run: RunRow, event: protocol.Completed) -> None:
        try:
            await until_stored(f"the result of training run {run.run_id}", lambda: self._complete(run, event))
        finally:
            self._completing.discard(run.run_id)

    async def _complete(self, run: RunRow, event: protocol.Completed) -> None:
        result = dict(event.result)
        status = result.get("status", "completed")
        if status != "completed":  # a run that stopped early reports it in its result
            await self._finished(run.run_id, "failed" if status == "failed" else "canceled",
                                 error=result.get("error"), result=result)
            return
        steps = int(result.get("steps") or run.progress_total)
        await self.store.set_final_progress(run.run_id, steps, max(steps, run.progress_total), result.get("loss"))
        if run.kind == DISTILL_KIND:  # it judged itself on the engine and is installed there when recommended
            await self._finished(run.run_id, "completed", result=result)
            try:
                await self.bot.catalog.refresh()
            except Exception as exc:  # the catalog catches up on its next refresh
                log.warning("adapter catalog not refreshed after %s: %s", run.run_id, exc)
            return
        recommended = await self.score(run)
        result["recommended_checkpoint"] = recommended
        await self._finished(run.run_id, "completed", result=result)
        if recommended is not None and self.config.training.drift_report:
            await self.measure_drift(run, recommended)

    async def score(self, run: RunRow) -> int | None:
        """Score the run's checkpoints (tagger in a thread); store and return the recommended step."""
        from training.data import checkpoints

        if run.kind == DISTILL_KIND:  # judged on the engine by its own distance measure, not by tags
            return None
        run_dir = self.run_dir(run)
        try:
            tag_fn = checkpoints.tagger_tag_fn(await self.tagger())
        except Exception as exc:  # no tagger: the pixel-based collapse score still ranks checkpoints
            log.warning("scoring run %s without the tagger: %s", run.run_id, exc)
            tag_fn = None
        try:
            scores = await asyncio.to_thread(checkpoints.score_run, run_dir, tag_fn)
        except Exception:
            log.exception("scoring run %s failed", run.run_id)
            return None
        recommended = checkpoints.recommend(scores).step if scores else None
        log.info("training run %s scored (%s): recommended step %s", run.run_id, "tagger" if tag_fn else "pixels",
                 recommended)
        await self.store.set_recommended(run.run_id, recommended)
        return recommended

    async def measure_drift(self, run: RunRow, step: int) -> None:
        """The run report's optional last part (``[training] drift_report``): the engine measures
        checkpoint ``step`` against the standard mode in every installed fast mode, between users'
        jobs, and writes the summary into the run's run.json (shown by /train checkpoints)."""
        engine = self._engine()
        request = protocol.DriftRequest(
            job_id=f"{run.run_id[:56]}-drift", owner=str(run.created_by),
            # One seed and three step counts keep the report to ~15 images per sample prompt.
            options=protocol.DriftOptions(checkpoint_run=run.run_id, checkpoint_step=step, seeds=[1], steps=[4, 6, 8]))
        try:
            if engine is None:
                raise RuntimeError("the engine is not connected")
            await engine.submit(request)
            log.info("training run %s: drift of checkpoint %d sent to the engine", run.run_id, step)
        except Exception as exc:  # optional: the run itself is complete either way
            log.warning("training run %s: drift measurement not started: %s", run.run_id, exc)

    async def _finished(self, run_id: str, status: str, *, error: str | None = None,
                        result: dict[str, Any] | None = None) -> None:
        if not await self.store.finish(run_id, status, error=error, result=result):
            return
        self._active.discard(run_id)
        log.info("training run %s %s%s", run_id, status, f": {error}" if error else "")
        self.changed(run_id)
        run = await self.store.get(run_id)
        if run is not None and self.notice is not None:
            self.spawn(self.notice(run, status))


def flow_for(bot: "ArcaeBot") -> TrainingFlow:
    """The bot's one ``TrainingFlow`` (made by whichever training cog loads first)."""
    flow = getattr(bot, "training_flow", None)
    if flow is None:
        flow = TrainingFlow(bot)
        bot.training_flow = flow  # type: ignore[attr-defined]
    return flow
