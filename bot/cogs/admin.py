"""Admin commands: engine status and the audit log.

Registered to the home servers only (``bot.app``), hidden from members by default permissions,
and checked server-side with ``require_admin`` because a server owner can re-grant commands to
anyone (and a stale or forged command may arrive from any server).
Training commands (/train, /adapter) arrive as their own cog and follow this pattern.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.i18n import _, interaction_language
from bot.policy import rating_status, require_admin
from bot.replies import reply

if TYPE_CHECKING:
    from bot.app import ArcaeBot


class Admin(commands.Cog):
    """Engine status and audit log, for admins."""

    admin_only = True  # its commands are registered to the home servers only (bot.app)

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot

    @app_commands.command(name="status", description="Engine status, queue and loaded adapters (admins)")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    async def status(self, interaction: discord.Interaction) -> None:
        require_admin(interaction, self.bot.config)
        await interaction.response.defer(ephemeral=True, thinking=True)
        language = interaction_language(interaction)

        def t(msgid: str, **params: object) -> str:
            return _(msgid, **params).render(language)

        embed = discord.Embed(title=t("Arcae status"), colour=embeds.COLOR)
        embed.add_field(name=t("Jobs waiting or running"), value=str(await self.bot.db.count_active()))
        engine = self.bot.jobs.engine
        try:
            status = await engine.status() if engine is not None else None
        except Exception as exc:
            status = None
            embed.add_field(name=t("Engine"), value=embeds.truncate(t("unavailable: %(error)s", error=exc), 1024),
                            inline=False)
        if status is not None:
            embed.add_field(name=t("Engine"), value=f"{status.model} on {status.device} {status.dtype}".strip())
            embed.add_field(name=t("Engine queue"), value=str(status.queue_length))
            embed.add_field(name=t("Running"), value=f"`{status.running_job}`" if status.running_job else t("idle"))
            embed.add_field(name=t("Loaded adapters"), inline=False,
                            value=embeds.truncate(", ".join(status.loaded_adapters) or t("none"), 1024))
            # The rating status is an operator's diagnosis naming config keys: it stays English.
            embed.add_field(name=t("Output rating"), inline=False,
                            value=embeds.truncate(rating_status(status.rates_outputs, self.bot.config), 1024))
        workers_text = getattr(engine, "workers_text", None)  # the Redis dispatcher (scale-out mode)
        if workers_text is not None:
            try:
                text = await workers_text(1024)
            except Exception as exc:
                text = embeds.truncate(t("unavailable: %(error)s", error=exc), 1024)
            embed.add_field(name=t("Workers"), value=text, inline=False)
        await reply(interaction, "", embed=embed)

    @app_commands.command(name="audit", description="Recent admin actions (admins)")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    async def audit(self, interaction: discord.Interaction) -> None:
        require_admin(interaction, self.bot.config)
        rows = await self.bot.db.audit_entries(interaction.guild_id, 20)  # this server's actions only
        lines = [f"<t:{int(r['at'])}:R> <@{r['user_id']}> {r['action']} `{r['target']}` "
                 f"{embeds.truncate(json.dumps(json.loads(r['detail_json'])), 200)}" for r in rows]
        await reply(interaction, embeds.truncate("\n".join(lines) or _("No admin actions recorded.")
                                                 .render(interaction_language(interaction)), 2000))


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(Admin(bot))
