"""The life of a job on the bot's side: persist, submit, follow engine events, deliver.

The database is the durable record; the engine (or the Redis dispatcher, same interface)
does the work. Engine events are applied idempotently by (job_id, attempt, seq): a
duplicate or an event from an older attempt changes nothing. Status edits are coalesced
so a job's message is edited at most once per ``progress_edit_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from bot import embeds
from bot.db import Job
from bot.db_retry import until_stored
from bot.delivery import Delivery, delivery_file
from bot.engine_failures import job_failed, not_started, stored_failure
from bot.errors import Refused
from bot.i18n import _
from bot.picture_jobs import pending_fetch
from bot.results import ResultLimits, ResultRejected, accept_completed, accept_preview
from bot.uploads import is_upload
from bot.views import progress_view
from engine.contract import protocol
from engine.contract.transport import EngineRejected, EngineTransport, EngineUnavailable

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)

# A job whose engine died under it twice is not tried a third time.
MAX_ATTEMPTS = 2
# How often undelivered results are retried while the bot runs.
REDELIVER_INTERVAL_S = 120.0


def new_job_id() -> str:
    """Short, sortable, unguessable enough to put in a button's custom id."""
    return f"{int(time.time()):x}{secrets.token_hex(3)}"


@dataclass
class LiveJob:
    """In-memory view of a job while it waits or runs (what its message should show)."""

    attempt: int
    last_seq: int = -1
    state: str = "queued"
    position: int | None = None
    step: int | None = None
    total: int | None = None
    shown: str = ""
    # The latest step preview (checked JPEG bytes) and whether the message shows it yet.
    preview: bytes | None = None
    preview_shown: bool = True
    last_edit: float = 0.0
    final: bool = False
    task: asyncio.Task[None] | None = None
    language: str | None = None  # the requester's catalog (bot.i18n)
    edit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JobManager:
    """Submits jobs, applies engine events, drives status edits and delivery."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot
        self.config = bot.config
        self.db = bot.db
        self.delivery = Delivery(bot)
        self.engine: EngineTransport | None = None  # EngineLink or Dispatcher, set by the bot at start
        self._live: dict[str, LiveJob] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[Callable[[Any], Awaitable[None]]] = []
        self._connect_listeners: list[Callable[[], Awaitable[None]]] = []
        self._delivering: set[str] = set()
        # Jobs whose user's picture is being fetched (bot.picture_jobs): submitted when it is stored.
        self.fetching: set[str] = set()

    # ------------------------------------------------------------------ submitting

    def _spawn(self, coro: Any) -> None:
        async def logged() -> None:
            try:
                await coro
            except Exception:
                # The job stays undelivered in the database; the next start retries it.
                log.exception("background job work failed")

        task = asyncio.create_task(logged())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _request(self, job: Job) -> Any:
        owner = str(job.user_id)
        if job.kind == "txt2img":
            return protocol.GenerateRequest(job_id=job.job_id, owner=owner, attempt=job.attempt, params=job.params)
        # A user's picture has no stored request to start from (mode "image"); the jobs table's
        # kind predates image input, so such a job is a "variation" whose source is an upload.
        mode = "image" if is_upload(job.source_image) else job.kind
        return protocol.Img2ImgRequest(job_id=job.job_id, owner=owner, attempt=job.attempt, mode=mode,
                                       source=Path(job.source_image or "").name, params=job.params,
                                       strength=job.params.strength if mode == "image" else job.strength)

    def _live_for(self, job: Job) -> LiveJob:
        live = self._live.get(job.job_id)
        if live is None or live.attempt < job.attempt:
            new = LiveJob(attempt=job.attempt, last_seq=job.last_seq, language=job.locale)
            if live is not None:
                # A new attempt edits the same message: same pace, and the old attempt's pending
                # edit (a stale "step 17/60") must not land after the new attempt's status.
                live.final = True
                new.shown, new.last_edit, new.edit_lock = live.shown, live.last_edit, live.edit_lock
            live = self._live[job.job_id] = new
        return live

    async def submit(self, job: Job) -> None:
        """Hand a persisted job to the engine; an unavailable engine leaves it pending for later."""
        live = self._live_for(job)
        if self.engine is None:
            live.state = "unavailable"
            self._schedule(job.job_id)
            return
        try:
            queued = await self.engine.submit(self._request(job))
        except EngineUnavailable:
            log.info("job %s stays pending: engine unavailable", job.job_id)
            live.state = "unavailable"
            self._schedule(job.job_id)
            return
        except EngineRejected as exc:
            await self._fail(job.job_id, not_started(exc.code, exc.message), error=f"{exc.code}: {exc.message}")
            return
        if live.state in ("queued", "unavailable", "restarting"):
            live.state = "queued"
            live.position = getattr(queued, "position", None)
            self._schedule(job.job_id)

    async def cancel(self, job_id: str) -> bool:
        """Ask the engine to stop a job; a job the engine does not hold is canceled here."""
        job = await self.db.get_job(job_id)
        if job is None or job.status not in ("pending", "running"):
            return False
        held = False
        if self.engine is not None:
            try:
                held = await self.engine.cancel(job_id)
            except EngineUnavailable:
                held = False
        if not held:
            await self._canceled(job_id)
        return True

    async def resubmit_unfinished(self) -> None:
        """On (re)connect: pending jobs again, running ones as a new attempt (at most ``MAX_ATTEMPTS``)."""
        for job in await self.db.jobs_with_status("pending", "running"):
            if job.job_id in self.fetching:
                continue  # submitted once its picture is stored
            refetch = pending_fetch(self, job)
            if refetch is not None:  # the bot stopped while fetching the user's picture: fetch it again
                self._spawn(refetch)
                continue
            if job.status == "running":
                if job.attempt >= MAX_ATTEMPTS:
                    await self._fail(job.job_id, _("❌ Job `%(job_id)s` failed: the engine stopped twice while making "
                                                   "it. Please try again.", job_id=job.job_id),
                                     error="engine stopped during the job twice")
                    continue
                await self.db.set_attempt(job.job_id, job.attempt + 1)
                job = await self.db.get_job(job.job_id) or job
            await self.submit(job)

    async def deliver_pending_results(self, *, older_than_s: float = 0.0) -> None:
        """Results recorded but never shown (a crash or a Discord outage in between)."""
        for job in await self.db.undelivered():
            if job.job_id in self._delivering or time.time() - (job.finished_at or 0) < older_than_s:
                continue
            try:
                if job.status == "completed":
                    await self._deliver(job.job_id)
                else:
                    await self._deliver_failure(job.job_id, stored_failure(job.job_id, job.error))
            except Exception:
                log.exception("delivery of job %s failed again; will retry on next start", job.job_id)

    def describe_state(self, job: Job) -> str:
        """Where a waiting or running job stands, for /queue."""
        live = self._live.get(job.job_id)
        if live is None:
            return job.status
        if live.state == "running" and live.step is not None and live.total:
            return f"running, step {live.step}/{live.total}"
        if live.state == "queued" and live.position is not None:
            return "next" if live.position == 0 else f"queued, position {live.position + 1}"
        if live.state in ("unavailable", "restarting"):
            return "waiting for the engine to restart"
        return live.state

    # ------------------------------------------------------------------ engine events

    def _lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def add_listener(self, listener: Callable[[Any], Awaitable[None]]) -> None:
        """Also hand every engine event to ``listener`` (e.g. a training cog following its runs)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Any], Awaitable[None]]) -> None:
        """Stop handing events to ``listener`` (one that waited for a single job's end)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def add_connect_listener(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Call ``listener`` after every (re)connection to the engine, after jobs were resubmitted."""
        self._connect_listeners.append(listener)

    async def notify_disconnect(self) -> None:
        """The engine link dropped (engine killed or restarting): say so on every waiting or running job.

        Without this a running job's message kept its last "Generating… step N/M" until the
        engine was back; the job is resubmitted on reconnect (``resubmit_unfinished``).
        """
        for job_id, live in list(self._live.items()):
            if not live.final and live.state in ("queued", "running", "unavailable"):
                live.state = "restarting"
                self._schedule(job_id)

    async def notify_connect(self) -> None:
        for listener in self._connect_listeners:
            try:
                await listener()
            except Exception:
                log.exception("engine connect listener %r failed", listener)

    async def on_event(self, event: Any) -> None:
        """EngineLink's callback: apply one event idempotently, then tell the listeners."""
        for listener in self._listeners:
            try:
                await listener(event)
            except Exception:
                log.exception("engine event listener %r failed", listener)
        if not isinstance(event, protocol.JOB_EVENT_TYPES):
            return

        async def apply() -> None:
            async with self._lock(event.job_id):
                await self._apply(event)

        try:
            # Locked by another process, disk full: retried until stored (in Redis mode the event
            # stays unacknowledged meanwhile), never dropped.
            await until_stored(f"{type(event).__name__} of job {event.job_id}", apply)
        except Exception:
            log.exception("applying %s for job %s failed", type(event).__name__, event.job_id)

    async def _apply(self, event: Any) -> None:
        job = await self.db.get_job(event.job_id)
        if job is None or job.status not in ("pending", "running"):
            return  # not ours (a training run), or already final: a duplicate
        # An older attempt's result (or cancel) is still the truth: an engine that kept running
        # while the bot restarted answers a resubmission with the job's final event. Its other
        # events are stale, and an older Failed is retried by the engine as the new attempt.
        final = isinstance(event, (protocol.Completed, protocol.Canceled))
        if event.attempt < job.attempt and not final:
            return
        if event.attempt > job.attempt:
            # The transport retried the job itself (the Redis dispatcher reclaims a dead worker's jobs).
            await self.db.adopt_attempt(job.job_id, event.attempt)
            job = await self.db.get_job(job.job_id) or job
        live = self._live_for(job)
        if event.attempt == live.attempt and event.seq <= live.last_seq and not final:
            return
        await self._apply_new(job, live, event)
        # Only once applied: an event whose write failed is retried, not taken for a duplicate.
        live.last_seq = max(live.last_seq, event.seq)

    async def _apply_new(self, job: Job, live: LiveJob, event: Any) -> None:
        completed = isinstance(event, protocol.Completed)
        if isinstance(event, protocol.Queued):
            if event.restarted:
                # Its worker stopped (Redis scale-out) and it runs again: the notice a restarting
                # engine gives, shown until the job starts again (an edit of its message, not a new one).
                live.state, live.position = "restarting", None
                self._schedule(job.job_id)
            elif live.state in ("queued", "unavailable", "restarting"):
                live.state, live.position = "queued", event.position
                self._schedule(job.job_id)
        elif isinstance(event, protocol.Started):
            await self.db.mark_running(job.job_id, job.attempt, event.seq)
            live.state = "running"
            self._schedule(job.job_id)
        elif isinstance(event, protocol.Progress):
            live.state, live.step, live.total = "running", event.step, event.total
            if event.preview_jpeg_b64:  # [engine] previews turns them off at the source
                self._take_preview(job.job_id, live, event.preview_jpeg_b64)
            self._schedule(job.job_id)
        elif completed:
            await self._on_completed(job, event)
        elif isinstance(event, protocol.Failed):
            await self._on_failed(job, event)
        elif isinstance(event, protocol.Canceled):
            await self._canceled(job.job_id)

    def _take_preview(self, job_id: str, live: LiveJob, data_b64: str) -> None:
        """Keep a progress event's preview for the next status edit; an unusable one is dropped, not shown."""
        try:
            live.preview = accept_preview(data_b64)  # at most 128 px from the engine: fast enough inline
            live.preview_shown = False
        except ResultRejected as exc:
            log.warning("job %s: preview not shown: %s", job_id, exc)

    async def _on_completed(self, job: Job, event: protocol.Completed) -> None:
        """Keep the result only as checked image bytes (``bot.results``); a bad one fails the job."""
        outputs_dir = self.config.path(self.config.storage.outputs_dir)
        try:
            event = await asyncio.to_thread(accept_completed, event, job.job_id, outputs_dir,
                                            ResultLimits.from_config(self.config))
        except ResultRejected as exc:
            log.warning("job %s: refused the engine's result: %s", job.job_id, exc)
            await self._fail(job.job_id, _("❌ Job `%(job_id)s` failed: the engine sent a result that is not a valid "
                                           "image. Please try again.", job_id=job.job_id), error=f"result refused: {exc}")
            return
        if await self.db.record_completion(job.job_id, event):
            self._spawn(self._deliver(job.job_id))

    async def _on_failed(self, job: Job, event: protocol.Failed) -> None:
        if event.retryable and job.attempt < MAX_ATTEMPTS:
            await self.db.set_attempt(job.job_id, job.attempt + 1)
            retry = await self.db.get_job(job.job_id)
            if retry is not None:
                self._spawn(self.submit(retry))
            return
        await self._fail(job.job_id, job_failed(job.job_id, event.error, event.message),
                         error=f"{event.error}: {event.message}")

    async def fail(self, job_id: str, text: object, *, error: str) -> None:
        """End a waiting job as failed and tell its user ``text`` on the job's message."""
        await self._fail(job_id, text, error=error)

    async def _fail(self, job_id: str, text: object, *, error: str) -> None:
        if await self.db.finish(job_id, "failed", error=error):
            self._spawn(self._deliver_failure(job_id, text))

    async def _canceled(self, job_id: str) -> None:
        if await self.db.finish(job_id, "canceled"):
            self._spawn(self._deliver_failure(job_id, _("✖️ Job `%(job_id)s` was canceled.", job_id=job_id)))

    # ------------------------------------------------------------------ showing

    def _schedule(self, job_id: str) -> None:
        live = self._live.get(job_id)
        if live is None or live.final:
            return
        if live.task is None or live.task.done():
            live.task = asyncio.create_task(self._flush(job_id, live))

    async def _flush(self, job_id: str, live: LiveJob) -> None:
        """Edit the job's message with its latest status, no more often than the configured pace."""
        interval = self.config.discord.progress_edit_interval_s
        while not live.final:
            wait = live.last_edit + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            async with live.edit_lock:
                text = embeds.status_line(job_id, live.state, position=live.position, step=live.step,
                                          total=live.total, language=live.language)
                preview = live.preview if not live.preview_shown else None
                if live.final or (text == live.shown and preview is None):
                    return
                job = await self.db.get_job(job_id)
                if job is None:
                    return
                # The preview rides on the same edit as the step count: one edit per interval, never two.
                files = [delivery_file(preview, f"preview_{job_id}.jpg")] if preview is not None else None
                try:
                    await self.delivery.edit_status(job, text, progress_view(job_id, language=job.locale),
                                                    attachments=files)
                except Exception:
                    log.exception("status edit for job %s failed", job_id)
                live.shown, live.last_edit, live.preview_shown = text, time.monotonic(), True

    async def _finalize_live(self, job_id: str) -> None:
        self._locks.pop(job_id, None)
        live = self._live.pop(job_id, None)
        if live is not None:
            async with live.edit_lock:
                live.final = True

    async def redeliver_loop(self, interval_s: float = REDELIVER_INTERVAL_S) -> None:
        """While running: retry deliveries that failed (Discord down for a while), never dropping one."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.deliver_pending_results(older_than_s=interval_s)
            except Exception:
                log.exception("retrying undelivered results failed")

    async def _deliver(self, job_id: str) -> None:
        if job_id in self._delivering:
            return
        self._delivering.add(job_id)
        try:
            await self._deliver_once(job_id)
        finally:
            self._delivering.discard(job_id)

    async def _deliver_once(self, job_id: str) -> None:
        await self._finalize_live(job_id)
        job = await self.db.get_job(job_id)
        if job is None or job.delivered_at is not None:
            return
        images = await self.db.images(job_id)
        message_id = await self.delivery.deliver_result(job, images)
        await self.db.mark_delivered(job_id, message_id)
        log.info("job %s delivered (%d image(s))", job_id, len(images))
        if self.config.gallery.post == "all" and self.config.gallery.channel_id:
            try:
                await self.post_to_gallery(job_id)
            except Refused as exc:  # the gallery's content rules keep this job out: nothing to tell anyone
                log.info("job %s not posted to the gallery: %s", job_id, exc.message)

    async def _deliver_failure(self, job_id: str, text: object) -> None:
        if job_id in self._delivering:
            return
        self._delivering.add(job_id)
        try:
            await self._deliver_failure_once(job_id, text)
        finally:
            self._delivering.discard(job_id)

    async def _deliver_failure_once(self, job_id: str, text: object) -> None:
        await self._finalize_live(job_id)
        job = await self.db.get_job(job_id)
        if job is None or job.delivered_at is not None:
            return
        message_id = await self.delivery.deliver_failure(job, text)
        await self.db.mark_delivered(job_id, message_id)

    async def _display_name(self, job: Job) -> str:
        guild = self.bot.get_guild(job.guild_id) if job.guild_id else None
        user: Any = (guild.get_member(job.user_id) if guild else None) or self.bot.get_user(job.user_id)
        if user is None:
            try:
                user = await self.bot.fetch_user(job.user_id)
            except Exception:  # a deleted account, or Discord unreachable: the post still goes out
                return f"user {job.user_id}"
        return user.display_name

    async def post_to_gallery(self, job_id: str) -> int | None:
        """Post a finished job to the gallery once; return the post's message id."""
        job = await self.db.get_job(job_id)
        if job is None or job.status != "completed":
            return None
        images = await self.db.images(job_id)
        existing = next((i.gallery_message_id for i in images if i.gallery_message_id), None)
        if existing:
            return existing
        author = await self._display_name(job)
        message_id = await self.delivery.post_gallery(job, images, author)
        if message_id is not None:
            await self.db.set_gallery_message(job_id, self.config.gallery.channel_id, message_id)
        return message_id
