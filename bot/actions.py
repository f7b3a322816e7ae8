"""Starting jobs, and what each result button does.

``start_job`` is the one path every new job takes (/imagine, Reroll, Variations, Upscale,
Remix): check limits and persist in one transaction (a SQLite commit takes milliseconds of
Discord's 3 s), then acknowledge, then submit.
Button handlers load the job from the database, so they work on messages older than the
bot's current process. Every press is first checked against the message it was made on: a
custom id naming a job that message does not show is refused. Reroll, Variations, Upscale and
Remix may be pressed by anyone who can see the result: the new job is the clicker's, under the
clicker's limits and the channel's content rules; Share, Delete and Cancel stay with the job's
author and the admins of the home server the job was made in.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, Awaitable, Callable, cast

import discord

from bot.db import Job
from bot.errors import InvalidOption, JobNotFound, NotAllowed, Refused, UserFacingError
from bot.i18n import _, interaction_language
from bot.job_manager import new_job_id
from bot.policy import (channel_is_nsfw, check_access, check_content, check_limits, check_ranges, content_rules,
                        is_admin, with_safety_negative)
from bot.replies import reply, report_error
from bot.uploads import is_upload
from bot.views import RemixModal
from engine.contract import protocol

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)


def bot_of(interaction: discord.Interaction) -> "ArcaeBot":
    return cast("ArcaeBot", interaction.client)


async def start_job(interaction: discord.Interaction, *, params: protocol.GenerationParams, kind: str = "txt2img",
                    source_image: str | None = None, parent_job_id: str | None = None,
                    strength: float | None = None) -> Job:
    """Check limits and persist (one transaction), then defer, then submit.

    The job row (with the interaction's token) is committed before Discord's acknowledgement,
    so a bot killed right after the ack finds the job on restart and answers it; a refusal is
    an immediate ephemeral reply, with no "thinking…" placeholder to clean up.
    """
    job = await store_and_acknowledge(interaction, params=params, kind=kind, source_image=source_image,
                                      parent_job_id=parent_job_id, strength=strength)
    await bot_of(interaction).jobs.submit(job)
    return job


async def store_and_acknowledge(interaction: discord.Interaction, *, params: protocol.GenerationParams,
                                kind: str = "txt2img", source_image: str | None = None,
                                parent_job_id: str | None = None, strength: float | None = None,
                                source_url: str | None = None) -> Job:
    """``start_job`` without the submit: the stored, acknowledged job (its picture may still be to fetch)."""
    bot = bot_of(interaction)
    admin = is_admin(interaction.user, interaction.guild, bot.config)
    job_id = new_job_id()
    await bot.db.insert_job(
        job_id=job_id, user_id=interaction.user.id, guild_id=interaction.guild_id,
        channel_id=interaction.channel_id or 0, kind=kind, params=params,
        nsfw_channel=channel_is_nsfw(interaction.channel), source_image=source_image, parent_job_id=parent_job_id,
        strength=strength, interaction_id=interaction.id, interaction_token=interaction.token, application_id=interaction.application_id,
        attachment_limit=interaction.filesize_limit, locale=interaction_language(interaction),
        admit=lambda: check_limits(bot.db, interaction.user.id, admin, bot.config), source_url=source_url)
    log.info("job %s (%s) from user %s persisted", job_id, kind, interaction.user.id)
    message_id = None
    try:
        if not interaction.response.is_done():
            response = await interaction.response.defer(thinking=True)
            message_id = getattr(response, "message_id", None)
        if message_id is None:
            message_id = (await interaction.original_response()).id
    except discord.HTTPException as exc:
        # Too late for the 3 s window (10062): the job is stored, so it still runs and its result goes
        # to the channel with a mention, as after a restart.
        log.warning("job %s: acknowledging interaction %s failed (%s)", job_id, interaction.id, exc)
    if message_id is not None:
        try:
            await bot.db.set_message_id(job_id, message_id)
        except sqlite3.OperationalError as exc:  # the job is stored; delivery finds "@original" without the id
            log.warning("job %s: storing its message id failed (%s)", job_id, exc)
    job = await bot.db.get_job(job_id)
    assert job is not None
    return job


async def load_job(bot: "ArcaeBot", job_id: str) -> Job:
    job = await bot.db.get_job(job_id)
    if job is None:
        raise JobNotFound(_("Job `%(job_id)s` is not known (it may have been made by another Arcae instance).",
                             job_id=job_id))
    return job


def require_owner_or_admin(interaction: discord.Interaction, job: Job, what: str, *,
                           where: int | None = None) -> None:
    """The job's author, or an admin of the home server it belongs to (``where``: default the job's server)."""
    bot = bot_of(interaction)
    if interaction.user.id == job.user_id:
        return
    server = job.guild_id if where is None else where
    if server != interaction.guild_id or not is_admin(interaction.user, interaction.guild, bot.config):
        raise NotAllowed(f"Only the person who made this image, or an admin, can {what}.")


def params_for_channel(interaction: discord.Interaction, params: protocol.GenerationParams) -> protocol.GenerationParams:
    """Re-apply the content rules of the channel a derived job is started in."""
    bot = bot_of(interaction)
    nsfw = channel_is_nsfw(interaction.channel)
    check_content(params.prompt, nsfw, bot.config)
    rules = content_rules(nsfw, bot.config)
    negative = params.negative_prompt
    if rules.safety_negative and rules.safety_negative not in (negative or ""):
        negative = with_safety_negative(negative, rules, bot.config)
    return params.model_copy(update={"negative_prompt": negative})


async def _reroll(interaction: discord.Interaction, job: Job) -> None:
    check_access(interaction, bot_of(interaction).config)
    params = params_for_channel(interaction, job.params.model_copy(update={"seed": None}))
    if is_upload(job.source_image):  # a picture's img2img rerolls from the same picture
        await start_job(interaction, params=params, kind=job.kind, source_image=job.source_image,
                        parent_job_id=job.job_id)
        return
    await start_job(interaction, params=params, kind="txt2img", parent_job_id=job.job_id)


async def _img2img(interaction: discord.Interaction, job: Job, mode: str, image: int, *,
                   subtle: bool = False) -> None:
    """Upscale or vary image number ``image`` (1-based) of a finished job, under the clicker's limits."""
    bot = bot_of(interaction)
    check_access(interaction, bot.config)
    images = await bot.db.images(job.job_id)
    if job.status != "completed" or not images:
        raise Refused(_("This job has no finished image to start from yet."))
    source = next((i for i in images if i.idx == image - 1), None)
    if source is None:
        raise Refused(_("This job has %(n)s image(s); there is no image %(image)s.", n=len(images), image=image))
    # An upscale keeps the image's own seed (each image of a batch has its own); a variation draws a new one.
    seed = None if mode == "variation" else source.seed
    params = params_for_channel(interaction, job.params.model_copy(update={"seed": seed, "count": 1,
                                                                                 "strength": None}))
    # A strong variation takes the engine's [generation] variation_strength; a subtle one the bot's smaller one.
    strength = bot.config.generation.subtle_variation_strength if subtle else None
    await start_job(interaction, params=params, kind=mode, source_image=source.path, parent_job_id=job.job_id,
                    strength=strength)


async def _share(interaction: discord.Interaction, job: Job) -> None:
    bot = bot_of(interaction)
    require_owner_or_admin(interaction, job, "share it")
    if not bot.config.gallery.channel_id or bot.config.gallery.post == "off":
        raise Refused(_("No gallery channel is configured on this server."))
    await interaction.response.defer(ephemeral=True, thinking=True)
    message_id = await bot.jobs.post_to_gallery(job.job_id)
    if message_id is None:
        raise Refused(_("Nothing to share: none of this job's images could be posted to the gallery channel."))
    await reply(interaction, _("Shared to %(channel)s.", channel=f"<#{bot.config.gallery.channel_id}>"))


async def _delete(interaction: discord.Interaction, job: Job) -> None:
    require_owner_or_admin(interaction, job, "delete it")
    await interaction.response.send_message(_("Deleted.").render(interaction_language(interaction)), ephemeral=True)
    if interaction.message is not None:
        await interaction.message.delete()
    await _audit_if_other(interaction, job, "delete_result")


async def _cancel(interaction: discord.Interaction, job: Job) -> None:
    require_owner_or_admin(interaction, job, "cancel it")
    # Canceling is a round trip to the engine (or Redis), which may be slow to answer: acknowledge first.
    await interaction.response.defer(ephemeral=True, thinking=True)
    if not await bot_of(interaction).jobs.cancel(job.job_id):
        raise Refused(_("Job `%(job_id)s` has already finished.", job_id=job.job_id))
    await reply(interaction, _("Canceling job `%(job_id)s`…", job_id=job.job_id))
    await _audit_if_other(interaction, job, "cancel_job")


async def _remix(interaction: discord.Interaction, job: Job) -> None:
    r, p = job.resolved, job.params
    await interaction.response.send_modal(RemixModal(
        job.job_id, submit=handle_remix_submit, prompt=p.prompt, negative=p.negative_prompt or "", seed=str(r.seed) if r else "",
        steps=str(r.steps if r else p.steps or ""), cfg=f"{r.cfg:g}" if r else (f"{p.cfg:g}" if p.cfg else "")))


async def _gallery_delete(interaction: discord.Interaction, job: Job) -> None:
    # The gallery post's server decides (the job may come from another home server).
    require_owner_or_admin(interaction, job, "remove it from the gallery", where=interaction.guild_id)
    await interaction.response.send_message(_("Removed from the gallery.").render(interaction_language(interaction)),
                                            ephemeral=True)
    if interaction.message is not None:
        await interaction.message.delete()
    await bot_of(interaction).db.set_gallery_message(job.job_id, None, None)
    await _audit_if_other(interaction, job, "remove_gallery_post")


async def _audit_if_other(interaction: discord.Interaction, job: Job, action: str) -> None:
    if interaction.user.id != job.user_id:
        await bot_of(interaction).db.audit(user_id=interaction.user.id, guild_id=interaction.guild_id,
                                           action=action, target=job.job_id, detail={"owner": job.user_id})


# Per-image actions (``bot.views.PER_IMAGE``): the image number is the third argument.
_IMAGE_BUTTONS: dict[str, Callable[[discord.Interaction, Job, int], Awaitable[None]]] = {
    "var": lambda i, j, n: _img2img(i, j, "variation", n),
    "vsub": lambda i, j, n: _img2img(i, j, "variation", n, subtle=True),
    "up": lambda i, j, n: _img2img(i, j, "upscale", n),
}

_BUTTONS: dict[str, Callable[[discord.Interaction, Job], Awaitable[None]]] = {
    "reroll": _reroll,
    "share": _share,
    "del": _delete,
    "cancel": _cancel,
    "remix": _remix,
    "gdel": _gallery_delete,
}


# Buttons under a gallery post; all others sit under the job's own message (some also on a /history page).
_GALLERY_ACTIONS = frozenset({"remix", "gdel"})
_HISTORY_ACTIONS = frozenset({"reroll", "var", "up", "share"})


def on_own_history(interaction: discord.Interaction, job: Job) -> bool:
    """A press by the job's author on an ephemeral message of this bot: a /history page (bot.cogs.history).

    Only its recipient sees an ephemeral message, and Discord delivers a press only for a custom id
    the clicked message carries; this bot puts job buttons in an ephemeral message only on /history,
    which lists the asker's own jobs. Stateless, so the page's buttons keep working after a restart.
    """
    message = interaction.message
    me = interaction.client.user
    return (message is not None and me is not None and message.author.id == me.id and message.flags.ephemeral
            and interaction.user.id == job.user_id)


async def check_message_shows(interaction: discord.Interaction, action: str, job: Job) -> None:
    """Refuse a press whose message is not the job's own (or its gallery post): a forged or stale custom id."""
    message_id = interaction.message.id if interaction.message is not None else None
    if action in _GALLERY_ACTIONS:
        shown = {i.gallery_message_id for i in await bot_of(interaction).db.images(job.job_id)}
    else:
        shown = {job.message_id}
        if action in _HISTORY_ACTIONS and on_own_history(interaction, job):
            return
    if message_id is None or message_id not in shown:
        log.warning("button %s:%s pressed by user %s on message %s, which is not that job's", action, job.job_id,
                    interaction.user.id, message_id)
        raise Refused(_("This button does not belong to job `%(job_id)s`; use the buttons under that job's own "
                        "message.", job_id=job.job_id))


async def handle_button(interaction: discord.Interaction, action: str, job_id: str, image: int = 1) -> None:
    """Every persistent button lands here (see ``bot.views.JobButton``); ``image`` is 1-based."""
    try:
        job = await load_job(bot_of(interaction), job_id)
        await check_message_shows(interaction, action, job)
        if action in _IMAGE_BUTTONS:
            await _IMAGE_BUTTONS[action](interaction, job, image)
        else:
            await _BUTTONS[action](interaction, job)
    except Exception as exc:
        await report_error(interaction, exc, job_id=job_id)


def _parse_number(text: str, name: str, kind: type) -> int | float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        if kind is int:
            raise InvalidOption(_("%(name)s must be a whole number (got %(text)s).", name=name, text=repr(text))) from None
        raise InvalidOption(_("%(name)s must be a number (got %(text)s).", name=name, text=repr(text))) from None


async def handle_remix_submit(interaction: discord.Interaction, job_id: str, values: dict[str, str]) -> None:
    """A submitted Remix modal: the edited parameters start a new job here."""
    bot = bot_of(interaction)
    try:
        job = await load_job(bot, job_id)
        seed = _parse_number(values["seed"], "seed", int)
        steps = _parse_number(values["steps"], "steps", int)
        cfg = _parse_number(values["cfg"], "cfg", float)
        prompt = values["prompt"].strip()
        check_ranges(bot.config, prompt=prompt, steps=cast(int | None, steps), cfg=cfg, count=1,
                     seed=cast(int | None, seed), weights={}, negative=values["negative"] or None)
        check_access(interaction, bot.config)
        params = job.params.model_copy(update={"prompt": prompt, "negative_prompt": values["negative"] or None,
                                               "seed": seed, "steps": steps, "cfg": cfg, "count": 1})
        await start_job(interaction, params=params_for_channel(interaction, params), parent_job_id=job_id)
    except UserFacingError as exc:
        await report_error(interaction, exc, job_id=job_id)
