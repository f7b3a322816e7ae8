"""/adapters: the installed LoRA adapters, paginated (kind, triggers, default weight)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.errors import InvalidOption
from bot.replies import reply

if TYPE_CHECKING:
    from bot.app import ArcaeBot

PAGE_SIZE = 10
KINDS = [app_commands.Choice(name=k, value=k) for k in ("style", "character", "lcm", "other")]


class Adapters(commands.Cog):
    """The adapter list."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot

    @app_commands.command(name="adapters", description="Installed adapters: kind, trigger words, default weight")
    @app_commands.guild_only()
    @app_commands.describe(kind="Only this kind", page="Page number")
    @app_commands.choices(kind=KINDS)
    async def adapters(self, interaction: discord.Interaction, kind: Optional[str] = None, page: int = 1) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self.bot.catalog.refresh()
        items = self.bot.catalog.all(kind)
        pages = max(1, math.ceil(len(items) / PAGE_SIZE))
        if not 1 <= page <= pages:
            raise InvalidOption(f"page must be between 1 and {pages}.")
        embed = discord.Embed(title=f"Adapters{f' ({kind})' if kind else ''} · page {page}/{pages}",
                              colour=embeds.COLOR)
        for a in items[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]:
            triggers = ", ".join(a.triggers) or "none"
            value = f"kind: {a.kind} · weight: {a.default_weight:g}\ntriggers: {triggers}"
            if a.description:
                value += f"\n{a.description}"
            embed.add_field(name=a.name, value=embeds.truncate(value, embeds.FIELD_LIMIT), inline=False)
        if not items:
            embed.description = "No adapters installed."
        await reply(interaction, "", embed=embed)


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(Adapters(bot))
