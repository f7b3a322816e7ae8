"""/settings: per-user defaults for /imagine (fast, aspect, negative prompt, style), stored."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.cogs.imagine import ASPECT_CHOICES, list_autocomplete
from bot.db import UserSettings
from bot.errors import InvalidOption
from bot.i18n import _, interaction_language, localize
from engine.contract.limits import has_visible_text
from bot.replies import reply

if TYPE_CHECKING:
    from bot.app import ArcaeBot


def settings_text(s: UserSettings, language: str | None = None) -> str:
    # The option names stay as typed in the command (like command names); unset values are translated.
    def show(v: object) -> str:
        return _("default").render(language) if v is None else str(v)

    return (f"fast: **{show(s.fast)}** · aspect: **{show(s.aspect)}** · style: **{show(s.style)}**\n"
            f"negative: {embeds.truncate(show(s.negative), 1500)}")


class Settings(commands.Cog):
    """Per-user defaults."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot

    @app_commands.command(name="settings", description="Your defaults for /imagine (no options: show them)")
    @app_commands.guild_only()
    @app_commands.describe(fast="Fast mode by default", aspect="Default aspect ratio",
                           negative="Default negative prompt ('-' clears it)", style="Default style adapter ('-' clears it)",
                           reset="Forget all your defaults")
    @app_commands.choices(aspect=ASPECT_CHOICES)
    async def settings(self, interaction: discord.Interaction, fast: Optional[bool] = None,
                       aspect: Optional[str] = None, negative: Optional[str] = None, style: Optional[str] = None,
                       reset: bool = False) -> None:
        db = self.bot.db
        current = UserSettings() if reset else await db.settings(interaction.user.id)
        if negative is not None and len(negative) > self.bot.config.generation.max_prompt_chars:
            raise InvalidOption(_("negative must be at most %(limit)s characters.",
                                  limit=self.bot.config.generation.max_prompt_chars))
        if negative is not None and not has_visible_text(negative):
            raise InvalidOption(_("negative must contain visible text (it is only spaces or invisible characters); "
                                  "use '-' to clear it."))
        if style not in (None, "-") and self.bot.catalog.all() and self.bot.catalog.get(style.strip()) is None:
            raise InvalidOption(_("Unknown style adapter %(style)s (see /adapters).", style=repr(style)))
        updated = UserSettings(
            fast=current.fast if fast is None else fast,
            aspect=current.aspect if aspect is None else aspect,
            negative=current.negative if negative is None else (None if negative.strip() == "-" else negative),
            style=current.style if style is None else (None if style.strip() == "-" else style.strip()),
        )
        changed = reset or any(v is not None for v in (fast, aspect, negative, style))
        if changed:
            await db.save_settings(interaction.user.id, updated)
        head = _("Saved. Your defaults:") if changed else _("Your defaults:")
        language = interaction_language(interaction)
        await reply(interaction, localize(head, language) + "\n" + settings_text(updated, language))

    @settings.autocomplete("style")
    async def style_autocomplete(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return list_autocomplete(current.split(",")[-1], self.bot.catalog.names(("style",)))


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(Settings(bot))
