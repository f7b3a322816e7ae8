"""Telling the user: ephemeral replies that work whether or not the interaction was answered."""

from __future__ import annotations

import logging

import discord

from bot.errors import UserFacingError
from bot.i18n import _, interaction_language, localize

log = logging.getLogger(__name__)


async def reply(interaction: discord.Interaction, content: object, *, ephemeral: bool = True,
                embed: discord.Embed | None = None) -> None:
    """Answer the interaction, or follow up when it was already answered (deferred).

    ``content`` may be a ``bot.i18n.Text``: it is rendered in the language of the interaction's user.
    """
    kwargs = {"content": localize(content, interaction_language(interaction))[:2000], "ephemeral": ephemeral}
    if embed is not None:
        kwargs["embed"] = embed
    if interaction.response.is_done():
        await interaction.followup.send(**kwargs)
    else:
        await interaction.response.send_message(**kwargs)


async def report_error(interaction: discord.Interaction, error: BaseException, *, job_id: str | None = None) -> None:
    """User-facing errors become an ephemeral message; anything else is logged with its traceback."""
    original = getattr(error, "original", None) or error
    language = interaction_language(interaction)
    if isinstance(original, UserFacingError):
        text = original.text_for(language)
    else:
        log.error("unexpected error in interaction %s (job %s)", interaction.id, job_id or "-",
                  exc_info=(type(original), original, original.__traceback__))
        text = _("Something went wrong on our side; it has been logged.").render(language)
        if job_id:
            text += _(" Job `%(job_id)s`.", job_id=job_id).render(language)
    try:
        await reply(interaction, text)
    except discord.HTTPException:
        log.warning("could not tell user %s about an error (interaction expired?)", interaction.user.id)
