"""img2img from a user's picture: fetching it for a job that is already stored (and again after a restart).

/imagine with ``image:`` commits the job row (with the attachment's address) before it
acknowledges, as every other job does; downloading and checking the picture (which can take
longer than Discord's 3 s) comes after. A bot killed in between finds the job on its next start
with no picture yet and fetches it again from the stored address (``refetch_and_submit``), so an
acknowledged job is never lost; a picture that cannot be had any more fails the job with a
message that says so, on the job's own message.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import discord

from bot.db import Job
from bot.errors import UserFacingError
from bot.i18n import _
from bot.uploads import Picture, check_picture, is_upload, store_picture
from engine.contract.config import ArcaeConfig

if TYPE_CHECKING:
    from bot.job_manager import JobManager

log = logging.getLogger(__name__)


def picture_missing(config: ArcaeConfig, job: Job) -> bool:
    """A job from a user's picture whose picture is not stored yet (the bot stopped while fetching it)."""
    if not is_upload(job.source_image):
        return False
    return not (Path(config.path(config.storage.outputs_dir)) / Path(job.source_image or "").name).is_file()


async def fetch_picture(config: ArcaeConfig, job: Job, read: Callable[[], Awaitable[Picture]]) -> None:
    """Download and check the picture with ``read``, then store it under the job's source name."""
    picture = await read()
    await asyncio.to_thread(store_picture, picture, config, name=Path(job.source_image or "").name)


async def submit_if_waiting(jobs: "JobManager", job_id: str) -> None:
    """Hand the job to the engine unless it ended meanwhile (canceled while its picture was fetched)."""
    job = await jobs.db.get_job(job_id)
    if job is not None and job.status == "pending":
        await jobs.submit(job)


# Waits between tries of a download that failed for a passing reason (Discord's CDN unreachable).
REFETCH_BACKOFF_S = (2.0, 10.0)


async def refetch_and_submit(jobs: "JobManager", job: Job) -> None:
    """After a restart: fetch a stored job's picture again from its address, then submit the job.

    A picture that cannot be had any more (its address expired, it is now refused, the CDN
    stays unreachable) fails the job with a message saying so, instead of leaving the
    acknowledged job waiting forever.
    """
    jobs.fetching.add(job.job_id)
    try:
        reason = await _refetch(jobs, job)
        if reason is not None:
            text = _("❌ Job `%(job_id)s` failed: the bot restarted before your picture was stored, and %(reason)s. "
                     "Please send it again.", job_id=job.job_id, reason=reason).render(job.locale)
            await jobs.fail(job.job_id, text, error=f"picture not fetched after a restart: {reason}")
            return
        log.info("job %s: its picture was fetched again after a restart", job.job_id)
        await submit_if_waiting(jobs, job.job_id)
    finally:
        jobs.fetching.discard(job.job_id)


async def _refetch(jobs: "JobManager", job: Job) -> str | None:
    """Store the job's picture from its address; None when stored, else why not (in the user's language)."""
    config = jobs.config
    if not job.source_url:
        return _("its address was not stored").render(job.locale)

    async def read() -> Picture:
        data = await jobs.bot.http.get_from_cdn(job.source_url or "")
        return await asyncio.to_thread(check_picture, data, "your picture", config)

    for wait in (*REFETCH_BACKOFF_S, None):
        try:
            await fetch_picture(config, job, read)
            return None
        except UserFacingError as exc:  # refused by the checks: trying again changes nothing
            return exc.text_for(job.locale)
        except Exception as exc:
            log.warning("job %s: fetching its picture again failed: %s", job.job_id, exc)
            if wait is None or isinstance(exc, (discord.NotFound, discord.Forbidden)):  # gone, or expired
                return _("it could not be downloaded again").render(job.locale)
            await asyncio.sleep(wait)
    return None  # not reached: the last try returns


def pending_fetch(jobs: "JobManager", job: Job) -> Any:
    """The coroutine that restarts ``job`` when its picture is missing, else None."""
    if job.job_id in jobs.fetching or not picture_missing(jobs.config, job):
        return None
    return refetch_and_submit(jobs, job)
