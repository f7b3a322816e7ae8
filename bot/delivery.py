"""Putting a job in front of its user: status edits, the final images, the gallery post.

While the interaction token lives (15 minutes) the job's own message is edited through
the interaction webhook; afterwards, or when Discord says the token is dead (50027), the
result goes to the channel as a new message that mentions the user. Files never exceed
the upload limit: a batch is split over several messages and a single file that is too
large is re-encoded as JPEG (the PNG with its parameters stays on disk; /info has them).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord
from PIL import Image as PILImage

from bot import embeds
from bot.db import Image, Job
from bot.errors import Refused
from bot.i18n import _, guild_language, localize
from bot.policy import ContentRules, channel_is_nsfw, content_rules, gallery_refusal
from bot.results import ResultLimits, ResultRejected, read_result, result_suffix
from bot.views import gallery_view, result_view

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)

TOKEN_LIFETIME_S = 15 * 60 - 30  # leave a margin: Discord kills the token at 15 minutes
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
MAX_FILES_PER_MESSAGE = 10
DEAD_TOKEN_CODES = {50027, 10015, 10062}


def token_dead(exc: discord.HTTPException) -> bool:
    """Discord's answer for an interaction token that expired or never existed."""
    return exc.code in DEAD_TOKEN_CODES or exc.status == 401


def delivery_file(data: bytes, filename: str) -> discord.File:
    """Bytes as an upload."""
    return discord.File(io.BytesIO(data), filename=filename)


@dataclass
class Prepared:
    """One image ready for upload."""

    filename: str
    data: bytes
    spoiler: bool
    reencoded: bool = False

    def file(self) -> discord.File:
        return discord.File(io.BytesIO(self.data), filename=self.filename, spoiler=self.spoiler)


def fit_to_limit(data: bytes, limit: int) -> bytes:
    """A JPEG of the image no larger than ``limit`` bytes (lower quality, then smaller)."""
    image = PILImage.open(io.BytesIO(data)).convert("RGB")
    quality = 90
    while True:
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality, optimize=True)
        if out.tell() <= limit or (image.width <= 64 and quality <= 40):
            return out.getvalue()
        if quality > 60:
            quality -= 15
        else:
            image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)))


def batches(files: list[Prepared], limit: int) -> list[list[Prepared]]:
    """Group files into messages: at most 10 files and ``limit`` bytes each."""
    groups: list[list[Prepared]] = [[]]
    size = 0
    for f in files:
        if groups[-1] and (size + len(f.data) > limit or len(groups[-1]) >= MAX_FILES_PER_MESSAGE):
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += len(f.data)
    return groups


class Delivery:
    """Status edits and result messages for jobs, with the channel as the fallback."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot
        self.config = bot.config

    def webhook_for(self, job: Job) -> discord.Webhook | None:
        """The interaction webhook of the job, while its token is still alive."""
        if not (job.interaction_token and job.application_id):
            return None
        if time.time() > job.created_at + TOKEN_LIFETIME_S:
            return None
        return discord.Webhook.partial(job.application_id, job.interaction_token, client=self.bot)

    async def message_id(self, job: Job, webhook: discord.Webhook) -> int | None:
        """The job's message; when the bot stopped between the ack and storing its id, the "@original" one."""
        if job.message_id is not None:
            return job.message_id
        try:  # a str "@original" is what Discord's route takes; discord.py only formats it into the path
            original = await webhook.fetch_message("@original")  # type: ignore[arg-type]
        except discord.HTTPException as exc:
            if token_dead(exc) or exc.status == 404:
                return None  # never acknowledged (killed before the defer): the channel gets the answer
            raise
        await self.bot.db.set_message_id(job.job_id, original.id)
        return original.id

    def channel(self, job: Job) -> discord.abc.Messageable:
        return self.bot.get_channel(job.channel_id) or self.bot.get_partial_messageable(
            job.channel_id, guild_id=job.guild_id)

    async def edit_status(self, job: Job, content: str, view: discord.ui.View | None, *,
                          attachments: list[discord.File] | None = None) -> bool:
        """Edit the job's own message; False when the token or message is gone.

        ``attachments`` replace the message's files (a step preview; [] removes it); None keeps them.
        """
        webhook = self.webhook_for(job)
        if webhook is None:
            return False
        try:
            message_id = await self.message_id(job, webhook)
            if message_id is None:
                return False
            if attachments is None:
                await webhook.edit_message(message_id, content=content, view=view)
            else:
                await webhook.edit_message(message_id, content=content, view=view, attachments=attachments)
            return True
        except discord.HTTPException as exc:
            if token_dead(exc) or exc.status == 404:
                return False
            raise

    def image_bytes(self, image: Image) -> bytes:
        """A stored result, read only from inside the outputs folder and checked (``bot.results``)."""
        return read_result(self.config.path(self.config.storage.outputs_dir), image.path,
                           ResultLimits.from_config(self.config))

    def prepare(self, job: Job, images: list[Image], rules: ContentRules, limit: int) -> tuple[list[Prepared], list[str]]:
        """Files to upload, and notes for the user (withheld, missing, re-encoded)."""
        files, notes, language = [], [], job.locale  # the notes are for the requester
        withheld = [img for img in images if rules.withheld(img.rating)]
        if withheld:
            ratings = ", ".join(sorted({_("rated %(rating)s", rating=img.rating).render(language) if img.rating
                                        else _("not rated (the content rater is off)").render(language)
                                        for img in withheld}))
            notes.append(_("🔞 %(n)s image(s) withheld: %(ratings)s, and this channel is not age-restricted. Run it "
                           "in an age-restricted channel to see it.", n=len(withheld), ratings=ratings).render(language))
        for img in images:
            if img in withheld:
                continue
            try:
                data = self.image_bytes(img)
            except (OSError, ResultRejected) as exc:
                log.warning("job %s image %d not shown: %s", job.job_id, img.idx + 1,
                            exc if isinstance(exc, ResultRejected) else type(exc).__name__)
                notes.append(_("⚠️ Image %(n)s is missing on the server (seed %(seed)s).", n=img.idx + 1,
                               seed=img.seed).render(language))
                continue
            name = f"arcae_{job.job_id}_{img.idx + 1}{result_suffix(img.path)}"
            prepared = Prepared(name, data, spoiler=rules.spoilered(img.rating))
            if len(data) > limit:
                prepared = Prepared(name[:-4] + ".jpg", fit_to_limit(data, limit), prepared.spoiler, True)
            files.append(prepared)
        if any(f.reencoded for f in files):
            notes.append(_("ℹ️ Some images were re-encoded as JPEG to fit the upload limit; the PNG with its "
                           "parameters is kept on the server (`/info %(job_id)s`).", job_id=job.job_id).render(language))
        return files, notes

    def _result_view(self, job: Job, count: int) -> discord.ui.View:
        g = self.config.gallery
        share = g.channel_id != 0 and g.post == "shared"
        return result_view(job.job_id, share=share, upscale=job.kind != "upscale", count=count,
                           language=job.locale)

    async def deliver_result(self, job: Job, images: list[Image]) -> int | None:
        """Show a finished job; return the id of the message that carries its buttons."""
        rules = content_rules(job.nsfw_channel, self.config)
        limit = job.attachment_limit or DEFAULT_UPLOAD_LIMIT
        # Reading the PNGs and re-encoding a too-large one with PIL take long enough to stall the
        # gateway heartbeat and every other interaction: off the event loop.
        files, notes = await asyncio.to_thread(self.prepare, job, images, rules, limit)
        groups = batches(files, limit)
        embed = embeds.params_embed(job, title=_("Done").render(job.locale), language=job.locale)
        note = "\n".join(notes)
        webhook = self.webhook_for(job)
        message_id = await self.message_id(job, webhook) if webhook is not None else None
        if webhook is not None and message_id is not None:
            try:
                await webhook.edit_message(message_id, content=embeds.truncate(note, 2000) or None, embed=embed,
                                           attachments=[f.file() for f in groups[0]],
                                           view=self._result_view(job, len(images)))
                for group in groups[1:]:
                    await webhook.send(files=[f.file() for f in group], wait=True)
                return message_id
            except discord.HTTPException as exc:
                if not (token_dead(exc) or exc.status == 404):
                    raise
                log.info("job %s: interaction token expired; delivering to the channel", job.job_id)
        return await self._deliver_to_channel(job, groups, embed, note, len(images))

    async def _deliver_to_channel(self, job: Job, groups: list[list[Prepared]], embed: discord.Embed,
                                  note: str, count: int) -> int:
        channel = self.channel(job)
        mention = discord.AllowedMentions(users=True, roles=False, everyone=False)
        done = _("<@%(user)s> your job `%(job_id)s` is done.", user=job.user_id, job_id=job.job_id)
        content = embeds.truncate(f"{done.render(job.locale)}\n{note}".strip(), 2000)
        first = await channel.send(content=content, embed=embed, files=[f.file() for f in groups[0]],
                                   view=self._result_view(job, count), allowed_mentions=mention)
        for group in groups[1:]:
            await channel.send(files=[f.file() for f in group])
        return first.id

    async def deliver_failure(self, job: Job, text: object) -> int | None:
        """Tell the user a job failed or was canceled, on its message or in the channel (in their language)."""
        text = localize(text, job.locale)
        # attachments=[]: a step preview shown while the job ran goes with it.
        if await self.edit_status(job, embeds.truncate(text, 2000), None, attachments=[]):
            return job.message_id  # None after an "@original" edit: mark_delivered keeps the stored id
        msg = await self.channel(job).send(
            content=embeds.truncate(f"<@{job.user_id}> {text}", 2000),
            allowed_mentions=discord.AllowedMentions(users=True, roles=False, everyone=False))
        return msg.id

    async def _gallery_channel(self, channel_id: int) -> object | None:
        """The gallery channel from the cache, else from Discord; None when it cannot be learnt."""
        channel = self.bot.get_channel(channel_id)
        if channel is not None:
            return channel
        try:
            return await self.bot.fetch_channel(channel_id)
        except (discord.HTTPException, discord.InvalidData) as exc:
            log.warning("gallery channel %s cannot be fetched (%s); nothing is posted there", channel_id, exc)
            return None

    async def post_gallery(self, job: Job, images: list[Image], author: str) -> int | None:
        """Post a finished job to the gallery channel; None when nothing could be shown there.

        Raises ``Refused`` (saying why) when the job was made in another server than the gallery's, or the
        content rules keep it out. A gallery channel that cannot be looked up takes nothing: the rules fail closed.
        """
        channel_id = self.config.gallery.channel_id
        if not channel_id:
            return None
        gallery = await self._gallery_channel(channel_id)
        gallery_guild = getattr(getattr(gallery, "guild", None), "id", None)
        if gallery_guild is None or gallery_guild != job.guild_id:
            # The gallery is one channel of one server: results made in another server (or in a
            # gallery whose server cannot be learnt) never go there, shared or posted automatically.
            raise Refused(_("The gallery channel is on another server; results made here cannot be shared to it."))
        gallery_nsfw = channel_is_nsfw(gallery)
        refusal = gallery_refusal(job, images, gallery_nsfw, self.config)
        if refusal:
            raise Refused(refusal)
        rules = content_rules(gallery_nsfw, self.config)
        target = gallery if isinstance(gallery, discord.abc.Messageable) else self.bot.get_partial_messageable(channel_id)
        shown = [i for i in images if not rules.withheld(i.rating)]
        files, _notes = await asyncio.to_thread(self.prepare, job, shown, rules, DEFAULT_UPLOAD_LIMIT)
        if not files:
            return None
        # The gallery is read by the whole server: its post speaks the server's language, not the requester's.
        language = guild_language(getattr(gallery, "guild", None))
        embed = embeds.params_embed(job, title=_("Gallery").render(language), author=author, language=language)
        msg = await target.send(embed=embed, files=[f.file() for f in files[:MAX_FILES_PER_MESSAGE]],
                                view=gallery_view(job.job_id, language))
        return msg.id
