"""The gallery channel: star reactions counted (and taken back), the starboard, /gallery top."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.i18n import _, interaction_language
from bot.policy import blocked_tags_in, channel_is_nsfw
from bot.replies import reply
from bot.starboard import Starboard

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)


class Gallery(commands.Cog):
    """Stars on gallery posts, and the most starred."""

    gallery = app_commands.Group(name="gallery", description="The gallery channel", guild_only=True)

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot
        self.starboard = Starboard(bot)

    # Reaction events arrive for any message the bot can see; Starboard.counts keeps the stars.
    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        if self.starboard.counts(payload.channel_id, payload.emoji, payload.user_id):
            await self.starboard.starred(payload.message_id, payload.user_id)

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        if self.starboard.counts(payload.channel_id, payload.emoji, payload.user_id):
            await self.starboard.unstarred(payload.message_id, payload.user_id)

    @commands.Cog.listener()
    async def on_raw_reaction_clear(self, payload: discord.RawReactionClearEvent) -> None:
        if self.starboard.counts(payload.channel_id, None, None):
            await self.starboard.unstarred(payload.message_id, None)

    @commands.Cog.listener()
    async def on_raw_reaction_clear_emoji(self, payload: discord.RawReactionClearEmojiEvent) -> None:
        if self.starboard.counts(payload.channel_id, payload.emoji, None):
            await self.starboard.unstarred(payload.message_id, None)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        # A gallery post removed (its Remove button, or a moderator): its highlight goes too.
        if payload.channel_id == self.bot.config.gallery.channel_id:
            await self.starboard.withdrawn(payload.message_id)

    @gallery.command(name="top", description="The most starred gallery posts")
    async def top(self, interaction: discord.Interaction) -> None:
        count = self.bot.config.gallery.top_count
        # Fetch extra rows: some may be left out of a channel that is not age-restricted.
        rows = [r for r in await self.bot.db.top_gallery(count * 4, interaction.guild_id)
                if await self._listable(r, channel_is_nsfw(interaction.channel))][:count]
        if not rows:
            await reply(interaction, _("The gallery is empty so far."))
            return
        lines = []
        for rank, row in enumerate(rows, 1):
            prompt = json.loads(row["params_json"]).get("prompt", "")
            link = f"https://discord.com/channels/{row['guild_id']}/{row['gallery_channel_id']}/{row['gallery_message_id']}"
            lines.append(f"**{rank}.** {self.bot.config.gallery.star_emoji} {row['stars']} · <@{row['user_id']}> · "
                         f"[{embeds.truncate(prompt, 60)}]({link})")
        embed = discord.Embed(title=_("Gallery: most starred").render(interaction_language(interaction)),
                              colour=embeds.COLOR,
                              description=embeds.truncate("\n".join(lines), embeds.DESCRIPTION_LIMIT))
        await reply(interaction, "", embed=embed)

    async def _listable(self, row: object, nsfw_here: bool) -> bool:
        """Age-restricted jobs and prompts with blocked tags are listed only in age-restricted channels."""
        if nsfw_here:
            return True
        job = await self.bot.db.get_job(row["job_id"])  # type: ignore[index]
        if job is None or job.nsfw_channel:
            return False
        prompts = [job.params.prompt] + ([job.resolved.prompt] if job.resolved else [])
        return not any(blocked_tags_in(p, self.bot.config) for p in prompts)


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(Gallery(bot))
