"""/history: your own finished images in this server, newest first, a few per page, with their buttons.

The answer is private to the asker and lists only the asker's jobs started in the server asked
in (see README "Security model"). Each job shows a thumbnail, its parameters and the result
message's own buttons (Reroll, Variations, Upscale, Share: the same ``arcae:<action>:<job>`` ids),
so the existing handlers and their ownership checks decide what a press may do
(``bot.actions.on_own_history`` accepts them on an ephemeral page of the job's author, also
after a restart). The paging buttons live as long as Discord lets the answer be edited
(15 minutes); after that, /history again.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import secrets
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.db import Job
from bot.i18n import _, interaction_language, tr
from bot.policy import ContentRules, channel_is_nsfw, content_rules
from bot.replies import reply
from bot.results import ResultLimits, read_result
from bot.views import JobButton

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)
PER_PAGE = 3  # each job takes one row of buttons; Discord allows 5 rows, one is the pager
MAX_LISTED = 300
VIEW_TIMEOUT_S = 14 * 60  # within the 15 minutes an interaction's answer may be edited
THUMB_SIDE = 384
# Buttons a history page carries per job; Delete stays under the result itself.
HISTORY_ACTIONS = ("reroll", "var", "up", "share")


def thumbnail(data: bytes) -> bytes:
    """A small JPEG of a result (a page of full PNGs could pass Discord's upload limit)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=85)
    return out.getvalue()


def job_embed(job: Job, image_name: str | None, note: str) -> discord.Embed:
    """One listed job: prompt, the parameters that ran, its id; the thumbnail when it may be shown."""
    r, p = job.resolved, job.params
    prompt = note or embeds.truncate(r.prompt if r else p.prompt, 300)
    embed = discord.Embed(colour=embeds.COLOR, description=prompt)
    if r:
        embed.add_field(name="Seed", value=str(r.seed))
        embed.add_field(name="Size", value=f"{r.width}×{r.height}")
        embed.add_field(name="Steps · CFG", value=f"{r.steps} · {r.cfg:g}")
        embed.add_field(name="Sampler", value=r.sampler)
        embed.add_field(name="Mode", value=r.mode + (" · fast" if r.fast else ""))
        if r.adapters:
            embed.add_field(name="Adapters", value=embeds.truncate(embeds.adapters_text(r.adapters), 200))
    embed.add_field(name="Job", value=f"`{job.job_id}`")
    if image_name:
        embed.set_image(url=f"attachment://{image_name}")
    return embed


class HistoryView(discord.ui.View):
    """Newer / page / Older, plus each listed job's result buttons; pages are built on demand."""

    def __init__(self, bot: "ArcaeBot", job_ids: list[str], rules: ContentRules, language: str | None = None) -> None:
        super().__init__(timeout=VIEW_TIMEOUT_S)
        self.language = language
        self.bot = bot
        self.job_ids = job_ids
        self.rules = rules
        self.page = 0
        self.pages = max(1, math.ceil(len(job_ids) / PER_PAGE))
        nonce = secrets.token_hex(6)
        self.newer = discord.ui.Button(label=_("Newer").render(language), emoji="◀️", custom_id=f"arcae-history:{nonce}:newer", row=4)
        self.older = discord.ui.Button(label=_("Older").render(language), emoji="▶️", custom_id=f"arcae-history:{nonce}:older", row=4)
        self.newer.callback = self._newer  # type: ignore[method-assign]
        self.older.callback = self._older  # type: ignore[method-assign]

    def content(self) -> str:
        return _("Your images on this server, newest first · Page %(page)s/%(pages)s", page=self.page + 1,
                 pages=self.pages).render(self.language)

    async def render(self) -> tuple[list[discord.Embed], list[discord.File]]:
        """This page's embeds and thumbnails; the view's items are rebuilt for its jobs."""
        self.clear_items()
        shown, files = [], []
        g = self.bot.config.gallery
        for row, job_id in enumerate(self.job_ids[self.page * PER_PAGE:(self.page + 1) * PER_PAGE]):
            job = await self.bot.db.get_job(job_id)
            if job is None:
                continue
            name, note, file = await self._image(job, row)
            shown.append(job_embed(job, name, note))
            if file is not None:
                files.append(file)
            for action in HISTORY_ACTIONS:
                if (action == "up" and job.kind == "upscale") or (action == "share" and not
                                                                  (g.channel_id and g.post == "shared")):
                    continue
                button = JobButton(action, job.job_id)
                button.row = row
                self.add_item(button)
        self.newer.disabled = self.page == 0
        self.older.disabled = self.page >= self.pages - 1
        self.add_item(self.newer)
        self.add_item(self.older)
        return shown, files

    async def _image(self, job: Job, row: int) -> tuple[str | None, str, discord.File | None]:
        """(attachment name, note instead of the prompt, file) for a job's first image, under this channel's rules."""
        if self.rules.sfw and job.nsfw_channel:
            return None, "(made in an age-restricted channel: see it with /history there)", None
        images = await self.bot.db.images(job.job_id)
        if not images:
            return None, "", None
        first = images[0]
        if self.rules.withheld(first.rating):
            return None, "", None
        outputs = self.bot.config.path(self.bot.config.storage.outputs_dir)
        try:
            data = await asyncio.to_thread(lambda: thumbnail(read_result(outputs, first.path,
                                                                         ResultLimits.from_config(self.bot.config))))
        except Exception as exc:  # a deleted or damaged file: list the job without its picture
            log.warning("history: image of job %s unreadable (%s)", job.job_id, exc)
            return None, "", None
        spoiler = "SPOILER_" if self.rules.spoilered(first.rating) else ""
        name = f"{spoiler}{row}-{job.job_id}.jpg"
        return name, "", discord.File(io.BytesIO(data), filename=name)

    async def _turn(self, interaction: discord.Interaction, step: int) -> None:
        self.page = min(max(0, self.page + step), self.pages - 1)
        shown, files = await self.render()
        await interaction.response.edit_message(content=self.content(), embeds=shown, attachments=files, view=self)

    async def _newer(self, interaction: discord.Interaction) -> None:
        await self._turn(interaction, -1)

    async def _older(self, interaction: discord.Interaction) -> None:
        await self._turn(interaction, 1)


class History(commands.Cog):
    """The /history command."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot

    @app_commands.command(name="history", description="Your images on this server, newest first")
    @app_commands.guild_only()
    async def history(self, interaction: discord.Interaction) -> None:
        job_ids = await self.bot.db.finished_job_ids(interaction.user.id, interaction.guild_id, limit=MAX_LISTED)
        if not job_ids:
            await reply(interaction, tr(interaction, "You have no finished images on this server yet. "
                                                  "Make one with /imagine."))
            return
        view = HistoryView(self.bot, job_ids, content_rules(channel_is_nsfw(interaction.channel), self.bot.config),
                           interaction_language(interaction))
        shown, files = await view.render()
        await interaction.response.send_message(view.content(), embeds=shown, files=files, view=view, ephemeral=True)


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(History(bot))

