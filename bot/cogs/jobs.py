"""/queue, /cancel and /info: where a user's jobs stand, stopping one, and full parameters.

All three see only the server they are asked in, and /info only the asker's own jobs (a home
server's admins: that server's jobs), so no one reads another user's prompts by guessing ids or seeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.actions import load_job, require_owner_or_admin
from bot.db import Job
from bot.errors import JobNotFound, Refused
from bot.i18n import _, interaction_language, tr
from bot.policy import is_admin
from bot.replies import reply

if TYPE_CHECKING:
    from bot.app import ArcaeBot


class Jobs(commands.Cog):
    """Commands about jobs."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot

    @app_commands.command(name="queue", description="Your jobs and their place in the queue")
    @app_commands.guild_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        mine = await self.bot.db.user_jobs(interaction.user.id, guild_id=interaction.guild_id)
        total = await self.bot.db.count_active_in(interaction.guild_id)
        lines = []
        for job in mine:
            lines.append(f"`{job.job_id}` · {self.bot.jobs.describe_state(job)} · "
                         f"{embeds.truncate(job.params.prompt, 60)}")
        head = tr(interaction, "**%(total)s** job(s) waiting or running on this server.", total=total)
        body = "\n".join(lines) if lines else tr(interaction, "You have no jobs waiting or running.")
        await reply(interaction, f"{head}\n{body}")

    @app_commands.command(name="cancel", description="Cancel your job (admins: any job)")
    @app_commands.guild_only()
    @app_commands.describe(job_id="The job to cancel (default: your latest waiting or running job)")
    async def cancel(self, interaction: discord.Interaction, job_id: Optional[str] = None) -> None:
        if job_id is None:
            mine = await self.bot.db.user_jobs(interaction.user.id, guild_id=interaction.guild_id)
            if not mine:
                raise Refused(_("You have no job waiting or running."))
            job = mine[-1]
        else:
            job = await load_job(self.bot, job_id.strip())
        require_owner_or_admin(interaction, job, "cancel it")
        # Canceling is a round trip to the engine (or Redis), which may be slow to answer: acknowledge first.
        await interaction.response.defer(ephemeral=True, thinking=True)
        if not await self.bot.jobs.cancel(job.job_id):
            raise Refused(_("Job `%(job_id)s` has already finished (%(status)s).", job_id=job.job_id, status=job.status))
        if interaction.user.id != job.user_id:
            await self.bot.db.audit(user_id=interaction.user.id, guild_id=interaction.guild_id, action="cancel_job",
                                    target=job.job_id, detail={"owner": job.user_id})
        await reply(interaction, tr(interaction, "Canceling job `%(job_id)s`…", job_id=job.job_id))

    @app_commands.command(name="info", description="The full parameters of a job (by job id or seed)")
    @app_commands.guild_only()
    @app_commands.describe(query="A job id, or a seed")
    async def info(self, interaction: discord.Interaction, query: str) -> None:
        query = query.strip()
        job = await self._visible_job(interaction, query)
        if job is None:
            # The same answer whether the job does not exist or is someone else's: ids and seeds reveal nothing.
            raise JobNotFound(_("No job of yours with id or seed `%(query)s`.", query=embeds.truncate(query, 80)))
        language = interaction_language(interaction)
        embed = embeds.params_embed(job, title=tr(interaction, "Job %(job_id)s · %(status)s", job_id=job.job_id,
                                                   status=job.status), language=language)
        if job.error:
            embed.add_field(name=tr(interaction, "Error"), value=embeds.truncate(job.error, embeds.FIELD_LIMIT), inline=False)
        await reply(interaction, "", embed=embed)

    async def _visible_job(self, interaction: discord.Interaction, query: str) -> Job | None:
        """The job ``query`` names (id, else seed) if the asker may read it: their own, or, for a home
        server's admins, any job started in that server."""
        admin = is_admin(interaction.user, interaction.guild, self.bot.config)

        def visible(job: Job | None) -> bool:
            return job is not None and (job.user_id == interaction.user.id
                                        or (admin and job.guild_id == interaction.guild_id))

        job = await self.bot.db.get_job(query)
        if visible(job):
            return job
        if not query.isdigit():
            return None
        found = await self.bot.db.jobs_by_seed(int(query), limit=1, user_id=interaction.user.id)
        if not found and admin:
            found = await self.bot.db.jobs_by_seed(int(query), limit=1, guild_id=interaction.guild_id)
        return found[0] if found and visible(found[0]) else None


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(Jobs(bot))
