"""/adapter: promote a run's checkpoint to a live adapter, roll back, delete, info, set-weight.

Admins only (hidden by default permissions and checked server-side), every change audit-logged.
Changes go through ``training.data.lifecycle`` (atomic: a half-written adapter is never live; every
promoted version is kept for rollback), then the engine rescans its adapters between jobs
(``ReloadAdaptersRequest``): the adapter is live without a restart. The bot and the engine share
``[adapters] dir`` (same host, or shared storage).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.distill_flow import DISTILL_KIND
from bot.errors import InvalidOption, Refused
from bot.i18n import _, interaction_language
from bot.policy import is_admin, require_admin
from bot.training_flow import TrainingFlow, flow_for
from bot.training_store import RunRow

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)


def lifecycle_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a ``training.data.lifecycle`` function; its refusals become messages for the admin."""
    from engine.contract.training_errors import TrainingError

    try:
        return fn(*args, **kwargs)
    except TrainingError as exc:
        raise InvalidOption(exc.message) from None


def set_default_weight(adapters_dir: Path, name: str, weight: float) -> None:
    """Rewrite the live adapter's ``default_weight`` (``training.data.lifecycle``, under its lock)."""
    from training.data import lifecycle

    lifecycle_call(lifecycle.set_default_weight, name, weight, adapters_dir)


class AdapterAdmin(commands.Cog):
    """The /adapter command group."""

    admin_only = True  # its commands are registered to the home servers only (bot.app)

    adapter = app_commands.Group(name="adapter", description="Manage live LoRA adapters (admins)",
                                 guild_only=True, default_permissions=discord.Permissions(manage_guild=True))

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot
        self.flow: TrainingFlow = flow_for(bot)

    async def _audit(self, interaction: discord.Interaction, action: str, target: str, **detail: Any) -> None:
        await self.flow.store.audit(user_id=interaction.user.id, guild_id=interaction.guild_id, action=action,
                                    target=target, detail=detail)

    async def _go_live(self, interaction: discord.Interaction) -> str:
        """Ask the engine to pick the change up now; say so if it cannot be reached."""
        from engine.contract.transport import EngineRejected, EngineUnavailable

        try:
            await self.flow.reload_adapters()
            return ""
        except (EngineUnavailable, EngineRejected) as exc:
            log.warning("adapter reload not done: %s", exc)
            return "\n" + _("⚠️ The engine could not reload its adapters now; it picks the change up when it "
                            "restarts.").render(interaction_language(interaction))

    # ------------------------------------------------------------------ promote

    @adapter.command(name="promote", description="Make a training run's checkpoint a live adapter (admins)")
    @app_commands.describe(run="Run id (default: the newest completed run)",
                           checkpoint="Checkpoint step (default: chosen, else recommended, else final)",
                           name="Adapter name (default: the run's)", weight="Default weight, -4 to 4")
    async def promote(self, interaction: discord.Interaction, run: Optional[str] = None,
                      checkpoint: Optional[int] = None, name: Optional[str] = None,
                      weight: Optional[float] = None) -> None:
        require_admin(interaction, self.bot.config)
        store = self.flow.store
        row = await store.get(run) if run else await store.latest(("completed",), guild_id=interaction.guild_id)
        if row is not None and row.guild_id != interaction.guild_id:
            row = None  # another server's run is not shown, even by id
        if row is None:
            raise InvalidOption(_("No training run `%(run_id)s`.", run_id=run) if run
                                else _("No completed training run to promote."))
        await self.promote_run(interaction, row, checkpoint=checkpoint, name=name, weight=weight)

    async def promote_run(self, interaction: discord.Interaction, row: RunRow, *, checkpoint: Optional[int] = None,
                          name: Optional[str] = None, weight: Optional[float] = None) -> None:
        """Promote a run of this server (the command, and the Promote button of its status message)."""
        from training.data import lifecycle

        if row.kind == DISTILL_KIND:  # a distillation the engine did not install: "Install anyway"
            from bot.distill_flow import install_anyway

            await install_anyway(self.flow, interaction, row, self._audit, self._go_live)
            return
        if row.active:
            raise Refused(_("Training run `%(run_id)s` is still %(status)s; promote it once it has completed (or "
                            "cancel it and promote one of its checkpoints).", run_id=row.run_id, status=_(row.status)))
        weight = self.bot.config.adapters.default_weight if weight is None else weight
        if not -4.0 <= weight <= 4.0:
            raise InvalidOption(_("weight must be between -4 and 4 (got %(weight)s).", weight=f"{weight:g}"))
        step = checkpoint if checkpoint is not None else (row.chosen_step or row.recommended_step)
        target = name or row.adapter_name
        await interaction.response.defer(ephemeral=True, thinking=True)
        result = await asyncio.to_thread(
            lifecycle_call, lifecycle.promote, self.flow.run_dir(row), step, target, self.flow.adapters_dir,
            kind=row.kind, triggers=[row.trigger] if row.trigger else [], default_weight=weight)
        await self.flow.store.set_promoted(row.run_id, target)
        self.flow.changed(row.run_id)  # the run's status message drops its Promote button
        await self._audit(interaction, "adapter.promote", target, run=row.run_id, step=step,
                          version=result.version, previous=result.previous, weight=weight)
        warning = await self._go_live(interaction)
        which = _("checkpoint step %(step)s", step=step) if step is not None else _("the final adapter")
        await interaction.followup.send(_(
            "✅ **%(name)s** v%(version)s is live: %(kind)s, trigger `%(trigger)s`, weight %(weight)s, from run "
            "`%(run_id)s` (%(which)s). Use it with /imagine %(option)s:%(name)s.", name=target, version=result.version,
            kind=_(row.kind), trigger=row.trigger, weight=f"{weight:g}", run_id=row.run_id, which=which,
            option=row.kind).render(interaction_language(interaction)) + warning, ephemeral=True)

    # ------------------------------------------------------------------ rollback / delete

    @adapter.command(name="rollback", description="Put back the version that was live before (admins)")
    @app_commands.describe(name="Adapter name")
    async def rollback(self, interaction: discord.Interaction, name: str) -> None:
        require_admin(interaction, self.bot.config)
        from training.data import lifecycle

        await interaction.response.defer(ephemeral=True, thinking=True)
        result = await asyncio.to_thread(lifecycle_call, lifecycle.rollback, name, self.flow.adapters_dir)
        await self._audit(interaction, "adapter.rollback", name, version=result.version, replaced=result.previous)
        warning = await self._go_live(interaction)
        replaced = f"v{result.previous}" if result.previous is not None else _("nothing (it was deleted)")
        await interaction.followup.send(_("↩️ **%(name)s** is back at v%(version)s (replacing %(replaced)s).",
                                          name=name, version=result.version, replaced=replaced)
                                        .render(interaction_language(interaction)) + warning, ephemeral=True)

    @adapter.command(name="delete", description="Take an adapter off the live list; rollback undoes it (admins)")
    @app_commands.describe(name="Adapter name")
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        require_admin(interaction, self.bot.config)
        from training.data import lifecycle

        await interaction.response.defer(ephemeral=True, thinking=True)
        result = await asyncio.to_thread(lifecycle_call, lifecycle.delete, name, self.flow.adapters_dir)
        await self._audit(interaction, "adapter.delete", name, version=result.previous)
        warning = await self._go_live(interaction)
        await interaction.followup.send(_("🗑️ **%(name)s** is no longer live (v%(version)s is kept: /adapter "
                                          "rollback brings it back).", name=name, version=result.previous)
                                        .render(interaction_language(interaction)) + warning, ephemeral=True)

    # ------------------------------------------------------------------ info / set-weight

    @adapter.command(name="info", description="An adapter's kind, triggers, weight and versions (admins)")
    @app_commands.describe(name="Adapter name")
    async def info(self, interaction: discord.Interaction, name: str) -> None:
        require_admin(interaction, self.bot.config)
        from training.data import lifecycle

        await interaction.response.defer(ephemeral=True, thinking=True)
        await self.bot.catalog.refresh()
        live = self.bot.catalog.get(name)
        versions = await asyncio.to_thread(lifecycle_call, lifecycle.versions, name, self.flow.adapters_dir)
        if live is None and not versions:
            known = ", ".join(a.name for a in self.bot.catalog.all()[:20]) or _("none")
            raise InvalidOption(_("No adapter `%(name)s`. Live adapters: %(known)s.", name=name, known=known))
        language = interaction_language(interaction)

        def t(msgid: str, **params: Any) -> str:
            return _(msgid, **params).render(language)

        embed = discord.Embed(title=t("Adapter %(name)s", name=name), colour=embeds.COLOR)
        if live is not None:
            embed.add_field(name=t("Kind"), value=t(live.kind))
            embed.add_field(name=t("Default weight"), value=f"{live.default_weight:g}")
            embed.add_field(name=t("Triggers"), value=", ".join(live.triggers) or t("none"))
            embed.add_field(name="sha256", value=f"`{live.sha256[:12]}`" if live.sha256 else "—")
            if live.description:
                embed.add_field(name=t("Description"), value=embeds.truncate(live.description, 1024), inline=False)
        else:
            embed.description = t("Not live (deleted); /adapter rollback brings the last version back.")
        lines = []
        for v in versions[-10:]:
            source = v.source.get("run_dir", "")
            origin = t("run `%(run)s` step %(step)s", run=Path(source).name, step=v.source.get("step")) if source \
                else t("added by hand")
            live_mark = t(" (live)") if v.live else ""
            lines.append(f"v{v.version}{live_mark}: {origin}, <t:{int(v.promoted_at)}:R>")
        embed.add_field(name=t("Versions"), value=embeds.truncate("\n".join(lines) or t("none recorded"), 1024),
                        inline=False)
        await interaction.followup.send(embed=embed, ephemeral=True)

    @adapter.command(name="set-weight", description="Change an adapter's default weight (admins)")
    @app_commands.describe(name="Adapter name", weight="Default weight, -4 to 4")
    async def set_weight(self, interaction: discord.Interaction, name: str, weight: float) -> None:
        require_admin(interaction, self.bot.config)
        if not -4.0 <= weight <= 4.0:
            raise InvalidOption(_("weight must be between -4 and 4 (got %(weight)s).", weight=f"{weight:g}"))
        await interaction.response.defer(ephemeral=True, thinking=True)
        old = self.bot.catalog.get(name)
        await asyncio.to_thread(set_default_weight, self.flow.adapters_dir, name, weight)
        await self._audit(interaction, "adapter.set_weight", name, weight=weight,
                          old=old.default_weight if old else None)
        warning = await self._go_live(interaction)
        await interaction.followup.send(_("⚖️ **%(name)s** now has default weight %(weight)s.", name=name,
                                          weight=f"{weight:g}").render(interaction_language(interaction)) + warning,
                                        ephemeral=True)

    # ------------------------------------------------------------------ drift

    @adapter.command(name="drift", description="Measure each fast mode against the standard mode for a mix (admins)")
    @app_commands.describe(adapters="The mix, e.g. `mystyle:0.8, hero-a` (default: the base alone)",
                           prompt="One fixed prompt (default: four built-in prompts)",
                           seeds="Seeds, e.g. `1,2` (default 1,2)",
                           modes="Fast modes, e.g. `lcm, dmd2` (default: every installed one)",
                           lcm_weights="LCM-LoRA weights 0.1-1.5 (default 0.25,0.5,0.75,1)",
                           steps="Step counts 1-8, e.g. `4-8` (default 4-8)")
    async def drift(self, interaction: discord.Interaction, adapters: Optional[str] = None,
                    prompt: Optional[str] = None, seeds: Optional[str] = None, modes: Optional[str] = None,
                    lcm_weights: Optional[str] = None, steps: Optional[str] = None) -> None:
        require_admin(interaction, self.bot.config)
        from bot.drift_flow import build_request

        request = build_request(f"drift-{interaction.id}", str(interaction.user.id), adapters=adapters,
                                prompt=prompt, seeds=seeds, modes=modes, lcm_weights=lcm_weights, steps=steps)
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self._audit(interaction, "adapter.drift", request.job_id, options=request.options.model_dump())
        await interaction.followup.send(**await drift_answer(self.bot, request, interaction_language(interaction)),
                                        ephemeral=True)

    # ------------------------------------------------------------------ distill-fast

    @adapter.command(name="distill-fast", description="Distil a few-step adapter that keeps a mix's style (admins)")
    @app_commands.describe(name="Name of the distilled adapter: letters, digits, _ . -",
                           mix="The mix it is for, e.g. `mystyle:0.8, hero-a` (default: the base alone)",
                           dataset="Dataset whose captions the teacher draws (default: the mix's own)",
                           steps="Optimizer steps (default 1000, capped by config)",
                           teacher_cfg="The teacher's CFG, baked into the adapter (1-30, default 6)",
                           teacher_steps="The teacher's sampling steps (1-150, default 25)",
                           student_steps="Steps fast mode runs and is judged at (1-8, default 4)",
                           lr="Learning rate, e.g. 0.0001", rank="LoRA rank from scratch (1-256, default 64)",
                           resolution="Square side in px (default: [training] resolution)",
                           init="Start from the stock few-step adapter or from scratch",
                           install="When to make it live (default: only when recommended)")
    @app_commands.choices(init=[app_commands.Choice(name="stock adapter when installed", value="auto"),
                                app_commands.Choice(name="from scratch", value="scratch")],
                          install=[app_commands.Choice(name="only when recommended", value="recommended"),
                                   app_commands.Choice(name="always", value="always"),
                                   app_commands.Choice(name="never (keep it in the run folder)", value="never")])
    async def distill_fast(self, interaction: discord.Interaction, name: str, mix: Optional[str] = None,
                           dataset: Optional[str] = None, steps: Optional[int] = None,
                           teacher_cfg: Optional[float] = None, teacher_steps: Optional[int] = None,
                           student_steps: Optional[int] = None, lr: Optional[float] = None,
                           rank: Optional[int] = None, resolution: Optional[int] = None,
                           init: Optional[str] = None, install: Optional[str] = None) -> None:
        require_admin(interaction, self.bot.config)
        from bot import distill_flow

        settings = distill_flow.settings_from(
            self.bot.config, name=name, mix=mix, dataset=dataset, steps=steps, teacher_cfg=teacher_cfg,
            teacher_steps=teacher_steps, student_steps=student_steps, lr=lr, rank=rank, resolution=resolution,
            init=init, install=install)
        await self.bot.catalog.refresh()
        datasets = await asyncio.to_thread(self.flow.datasets)
        distill_flow.check_targets(settings, self.bot.config, self.bot.catalog, datasets)
        await distill_flow.start(self.bot, self.flow, interaction, settings)

    # ------------------------------------------------------------------ autocomplete

    async def _autocomplete_adapters(self, interaction: discord.Interaction,
                                     current: str) -> list[app_commands.Choice[str]]:
        if not is_admin(interaction.user, interaction.guild, self.bot.config):
            return []
        self.bot.catalog.refresh_soon()
        names = [a.name for a in self.bot.catalog.all() if a.kind != "lcm"]
        versions_dir = self.flow.adapters_dir / ".versions"
        if versions_dir.is_dir():  # deleted adapters can be rolled back
            names += [p.name for p in versions_dir.iterdir() if p.is_dir() and p.name not in names]
        return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]

    async def _autocomplete_runs(self, interaction: discord.Interaction,
                                 current: str) -> list[app_commands.Choice[str]]:
        if not is_admin(interaction.user, interaction.guild, self.bot.config):
            return []
        from bot.cogs.training import run_choices

        runs: list[RunRow] = [r for r in await self.flow.store.recent(guild_id=interaction.guild_id) if not r.active]
        return run_choices(runs, current)

    async def _autocomplete_mix(self, interaction: discord.Interaction,
                                current: str) -> list[app_commands.Choice[str]]:
        """The mix typed so far with its last entry completed to a live adapter's name."""
        if not is_admin(interaction.user, interaction.guild, self.bot.config):
            return []
        self.bot.catalog.refresh_soon()
        head, _sep, last = current.rpartition(",")
        prefix = f"{head.strip()}, " if head.strip() else ""
        names = [a.name for a in self.bot.catalog.all() if a.kind != "lcm" and last.strip().lower() in a.name.lower()]
        return [app_commands.Choice(name=(prefix + n)[:100], value=(prefix + n)[:100]) for n in names][:25]

    async def _autocomplete_datasets(self, interaction: discord.Interaction,
                                     current: str) -> list[app_commands.Choice[str]]:
        if not is_admin(interaction.user, interaction.guild, self.bot.config):
            return []
        return await self.flow.dataset_choices(current)

    for _command in (rollback, delete, info, set_weight):
        _command.autocomplete("name")(_autocomplete_adapters)
    promote.autocomplete("run")(_autocomplete_runs)
    distill_fast.autocomplete("mix")(_autocomplete_mix)
    distill_fast.autocomplete("dataset")(_autocomplete_datasets)
    del _command


DRIFT_WAIT_S = 14 * 60  # an interaction's follow-ups expire after 15 minutes


async def drift_answer(bot: "ArcaeBot", request: Any, language: str | None = None) -> dict[str, Any]:
    """The follow-up for a drift measurement: the recommendation, the table and the chart, or why not."""
    import io
    import json

    from bot.drift_flow import chart_bytes, run_on_engine
    from engine.contract.transport import EngineRejected, EngineUnavailable

    def t(msgid: str, **params: Any) -> str:
        return _(msgid, **params).render(language)

    try:
        outcome = await run_on_engine(bot, request, DRIFT_WAIT_S)
    except EngineUnavailable as exc:
        return {"content": t("⚠️ The engine is not reachable now (%(error)s); try again shortly.", error=exc)}
    except EngineRejected as exc:
        return {"content": t("❌ Drift measurement refused: %(reason)s", reason=exc.message)}
    if not outcome.ok:
        return {"content": t("❌ Drift measurement `%(job_id)s`: %(reason)s", job_id=request.job_id,
                             reason=outcome.message)[:2000]}
    result = outcome.result
    files = [discord.File(io.BytesIO(json.dumps(result.get("report", {}), indent=2).encode()), filename="drift.json")]
    chart = chart_bytes(result)
    if chart is not None:
        files.insert(0, discord.File(io.BytesIO(chart), filename="drift.png"))
    table = str(result.get("table", ""))
    head = t("📏 **Drift report** (%(n)s images): %(summary)s", n=result.get("images", 0), summary=outcome.message)
    text = f"{head}\n```\n{table}\n```"
    if len(text) > 2000:  # Discord's message limit: the table travels as a file
        files.append(discord.File(io.BytesIO(table.encode()), filename="drift.txt"))
        text = f"{head}\n" + t("(the table is in drift.txt)")
    return {"content": text[:2000], "files": files}


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(AdapterAdmin(bot))
