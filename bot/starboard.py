"""The gallery starboard: star counts follow reactions; enough stars promote a post, fewer demote it.

Only ``[gallery] star_emoji`` on a gallery post counts, one per user; the post's author and the
bot are not counted (a post rises by other people's stars). A post reaching ``promote_at`` stars
is promoted: a highlight message (the image, the star count, a link to the post) goes to the
channel ``promote_to``, or, when that is 0, the post is pinned in the gallery channel. When
removed stars (or a moderator clearing the reactions) bring it below the threshold, the highlight
is deleted or the post unpinned. The promotion is recorded in ``gallery_highlights`` (migration
0014), so a restarted bot still demotes what it promoted before.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING

import discord

from bot import embeds
from bot.db import Image
from bot.i18n import _, guild_language
from bot.policy import ContentRules, channel_is_nsfw, content_rules, gallery_refusal

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)


class Starboard:
    """Counts stars and keeps each post's promotion in step with its count."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot
        self.config = bot.config.gallery
        # One promotion change at a time per post: two stars arriving together must not post
        # two highlights, nor a demotion race a promotion.
        self._locks: dict[int, asyncio.Lock] = {}

    def counts(self, channel_id: int, emoji: object, user_id: int | None) -> bool:
        """A reaction that may be a star: the star emoji, on the gallery channel, not by the bot."""
        if not self.config.channel_id or channel_id != self.config.channel_id:
            return False
        if emoji is not None and str(emoji) != self.config.star_emoji:
            return False
        me = self.bot.user
        return not (me is not None and user_id is not None and user_id == me.id)

    async def starred(self, message_id: int, user_id: int) -> None:
        await self._follow(message_id, await self.bot.db.add_star(message_id, user_id))

    async def unstarred(self, message_id: int, user_id: int | None) -> None:
        """One user's star taken back, or every star (``None``: the reactions were cleared)."""
        await self._follow(message_id, await self.bot.db.remove_star(message_id, user_id))

    async def _follow(self, message_id: int, stars: int | None) -> None:
        if stars is None:
            return  # not a gallery post
        log.info("gallery post %s has %d star(s)", message_id, stars)
        lock = self._locks.setdefault(message_id, asyncio.Lock())
        async with lock:
            # Count again under the lock: events that came meanwhile have been counted.
            current = await self._stars(message_id)
            highlight = await self._highlight(message_id)
            threshold = self.config.promote_at
            if threshold and current >= threshold and highlight is None:
                await self._promote(message_id, current)
            elif highlight is not None and (not threshold or current < threshold):
                await self._demote(message_id, highlight)
            elif highlight is not None and highlight["message_id"] is not None:
                await self._edit_count(highlight, message_id, current)

    async def withdrawn(self, message_id: int) -> None:
        """A gallery post was deleted: delete its highlight (a deleted post needs no unpinning)."""
        async with self._locks.setdefault(message_id, asyncio.Lock()):
            highlight = await self._highlight(message_id)
            if highlight is None:
                return
            if highlight["pinned"]:
                await self.bot.db._write("DELETE FROM gallery_highlights WHERE gallery_message_id = ?", (message_id,))
            else:
                await self._demote(message_id, highlight)

    # ------------------------------------------------------------------ records

    async def _stars(self, message_id: int) -> int:
        row = await self.bot.db._one("SELECT COUNT(*) FROM stars WHERE gallery_message_id = ?", (message_id,))
        return int(row[0]) if row else 0

    async def _highlight(self, message_id: int) -> dict[str, int | None] | None:
        row = await self.bot.db._one("SELECT * FROM gallery_highlights WHERE gallery_message_id = ?", (message_id,))
        return dict(row) if row else None

    async def promoted(self, message_id: int) -> bool:
        return await self._highlight(message_id) is not None

    # ------------------------------------------------------------------ Discord

    def _link(self, message_id: int) -> str:
        guild = self.bot.get_channel(self.config.channel_id)
        guild_id = getattr(getattr(guild, "guild", None), "id", "@me")
        return f"https://discord.com/channels/{guild_id}/{self.config.channel_id}/{message_id}"

    def _content(self, message_id: int, stars: int) -> str:
        return f"{self.config.star_emoji} **{stars}** · <#{self.config.channel_id}> · {self._link(message_id)}"

    async def _promote(self, message_id: int, stars: int) -> None:
        gallery = self.bot.get_partial_messageable(self.config.channel_id)
        target = self.config.promote_to
        try:
            if target:
                highlight_id = await self._post_highlight(message_id, stars)
                if highlight_id is None:
                    return
                channel_id, pinned = target, 0
            else:
                await gallery.get_partial_message(message_id).pin(reason=f"{stars} stars in the gallery")
                channel_id, highlight_id, pinned = self.config.channel_id, None, 1
        except discord.HTTPException as exc:  # missing permission, pin limit: say so in the log, count on
            log.warning("gallery post %s not promoted: %s", message_id, exc)
            return
        await self.bot.db._write("INSERT OR REPLACE INTO gallery_highlights VALUES (?, ?, ?, ?, ?)",
                                 (message_id, channel_id, highlight_id, pinned, time.time()))
        log.info("gallery post %s promoted (%d stars)", message_id, stars)

    async def _post_highlight(self, message_id: int, stars: int) -> int | None:
        """The highlight: the job's parameters, an image the highlight channel may show, the count, a link.

        The highlight channel's own content rules apply (it may be less age-restricted than the
        gallery): a job they keep out gets no highlight, and an image they would withhold or
        spoiler is not shown (an embed image cannot be spoilered).
        """
        job_id = await self.bot.db.job_for_gallery_message(message_id)
        job = await self.bot.db.get_job(job_id) if job_id else None
        if job is None:
            return None
        images = await self.bot.db.images(job.job_id)
        nsfw = channel_is_nsfw(await self._channel(self.config.promote_to))
        refusal = gallery_refusal(job, images, nsfw, self.bot.config)
        if refusal:
            log.warning("gallery post %s not highlighted in channel %s: %s", message_id, self.config.promote_to,
                        refusal)
            return None
        gallery = self.bot.get_partial_messageable(self.config.channel_id)
        try:
            post = await gallery.fetch_message(message_id)
        except discord.NotFound:
            return None  # the post is gone: nothing to promote
        # A channel post read by the whole server: in the server's language.
        language = guild_language(self.bot.get_guild(job.guild_id) if job.guild_id else None)
        embed = embeds.params_embed(job, title=_("Gallery highlight").render(language), language=language)
        url = _shown_image(post, images, content_rules(nsfw, self.bot.config))
        if url:
            embed.set_image(url=url)
        channel = self.bot.get_partial_messageable(self.config.promote_to)
        sent = await channel.send(self._content(message_id, stars), embed=embed,
                                  allowed_mentions=discord.AllowedMentions.none())
        return sent.id

    async def _channel(self, channel_id: int) -> object | None:
        """A channel from the cache, else from Discord; None (treated as not age-restricted) when unknown."""
        channel = self.bot.get_channel(channel_id)
        if channel is not None:
            return channel
        try:
            return await self.bot.fetch_channel(channel_id)
        except (discord.HTTPException, discord.InvalidData):
            return None

    async def _edit_count(self, highlight: dict[str, int | None], message_id: int, stars: int) -> None:
        channel = self.bot.get_partial_messageable(int(highlight["channel_id"] or 0))
        try:
            await channel.get_partial_message(int(highlight["message_id"] or 0)).edit(
                content=self._content(message_id, stars))
        except discord.HTTPException as exc:
            log.info("highlight of gallery post %s not updated: %s", message_id, exc)

    async def _demote(self, message_id: int, highlight: dict[str, int | None]) -> None:
        channel = self.bot.get_partial_messageable(int(highlight["channel_id"] or 0))
        try:
            if highlight["pinned"]:
                await channel.get_partial_message(message_id).unpin(reason="below the gallery's star threshold")
            elif highlight["message_id"] is not None:
                await channel.get_partial_message(int(highlight["message_id"])).delete()
        except discord.NotFound:
            pass  # already deleted or unpinned by hand: the record goes all the same
        except discord.HTTPException as exc:
            log.warning("gallery post %s not demoted: %s", message_id, exc)
            return
        await self.bot.db._write("DELETE FROM gallery_highlights WHERE gallery_message_id = ?", (message_id,))
        log.info("gallery post %s demoted", message_id)


def _shown_image(post: discord.Message, images: list[Image], rules: ContentRules) -> str | None:
    """The URL of the post's first image that ``rules`` show plainly (files are ``arcae_<job>_<n>.<ext>``)."""
    by_number = {img.idx + 1: img for img in images}
    for attachment in post.attachments:
        match = re.search(r"_(\d+)\.[a-z]+$", attachment.filename)
        image = by_number.get(int(match.group(1))) if match else None
        if image is None or attachment.filename.startswith("SPOILER_"):
            continue
        if not rules.withheld(image.rating) and not rules.spoilered(image.rating):
            return attachment.url
    return None
