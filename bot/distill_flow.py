"""``/adapter distill-fast`` without the command: check the options, record the run, send it, show its message.

A distillation run (``training.learning.distill`` on the engine's GPU worker) trains a few-step
(``lcm``) adapter for one adapter mix. The bot keeps it as a row of ``training_runs`` of kind
``distill``, written before the command is acknowledged, so everything /train runs have applies to
it too: engine events update the row, a reconnect resubmits it (the engine resumes from its newest
checkpoint), one run (training or distillation) at a time, and ``bot.training_live`` follows it
with a self-editing channel message (step, ETA, loss curve, the newest teacher / stock / distilled
grid, Cancel). This module supplies what differs: the request, the message's embed and the verdict
(distance before / stock / after, recommended or not, installed or not). The engine installs the
adapter itself when the run's judge recommends it (or ``install: always``) and reloads its adapters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from bot import embeds
from bot.errors import InvalidOption, Refused
from bot.i18n import Text, _, interaction_language, localize, tr
from bot.training_store import RunRow
from engine.contract import protocol

if TYPE_CHECKING:
    from bot.app import ArcaeBot
    from bot.training_flow import TrainingFlow

log = logging.getLogger(__name__)

DISTILL_KIND = "distill"  # training_runs.kind of a distillation run (adapter kinds are style/character)
LANGUAGE_KEY = "language"  # kept beside the settings in the row: the language of the run's messages
# What each option allows, for the message that refuses a bad value (the bounds of protocol.DistillSettings).
ALLOWED = {
    "name": "letters, digits, _ . - (up to 64, starting with a letter or digit)",
    "dataset": "a dataset name (see /train captions)",
    "steps": "1 to 100000", "teacher_cfg": "1 to 30", "teacher_steps": "1 to 150", "student_steps": "1 to 8",
    "lr": "0.0000001 to 0.1", "rank": "1 to 256", "resolution": "64 to 2048, a multiple of 8",
}


def settings_from(config: Any, **given: Any) -> protocol.DistillSettings:
    """The validated ``DistillSettings`` for the command's options; a bad one says what is allowed."""
    from pydantic import ValidationError

    from bot.drift_flow import parse_mix
    from training.data.distill_setup import DistillOptions

    options = {k: v for k, v in given.items() if v is not None}
    options["mix"] = parse_mix(given.get("mix"))
    options.setdefault("steps", DistillOptions.__dataclass_fields__["steps"].default)
    caps = {"steps": config.training.max_steps, "resolution": config.training.max_resolution}
    for key, cap in caps.items():
        if key in options and options[key] > cap:
            raise InvalidOption(_("Not started: %(option)s = %(value)s is over this server's cap of %(cap)s.",
                                  option=key, value=options[key], cap=cap))
    try:
        return protocol.DistillSettings(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err.get("loc", ("?",))[0])
        raise InvalidOption(_("Not started: %(option)s = %(value)s is not allowed; allowed: %(allowed)s.",
                              option=key, value=str(options.get(key))[:80], allowed=ALLOWED.get(key, err.get("msg")))
                            ) from None


def check_targets(settings: protocol.DistillSettings, config: Any, catalog: Any, datasets: list[str]) -> None:
    """Refuse a name that would replace another adapter, and captions the engine could not find."""
    existing = catalog.get(settings.name)
    if settings.name == config.adapters.lcm_adapter or (existing is not None and existing.kind != "lcm"):
        stock = existing is None or existing.kind == "lcm"
        what = "the stock few-step adapter" if stock else f"a {existing.kind} adapter"
        raise InvalidOption(_("Not started: `%(name)s` is already %(what)s; choose another name for the distilled "
                              "adapter.", name=settings.name, what=what))
    wanted = [settings.dataset] if settings.dataset else [a.name for a in settings.mix]
    if not any(name in datasets for name in wanted):
        known = ", ".join(datasets[:20]) or "none"
        if settings.dataset:
            raise InvalidOption(_("Not started: no dataset `%(dataset)s`. Datasets: %(known)s.",
                                  dataset=settings.dataset, known=known))
        raise InvalidOption(_("Not started: no dataset is named after the mix's adapters, so give dataset: (the "
                              "captions the teacher draws). Datasets: %(known)s.", known=known))


def request_for(run: RunRow) -> protocol.DistillRequest:
    """The ``DistillRequest`` of a stored run (its settings, without the bot's own keys)."""
    settings = {k: v for k, v in run.options.items() if k != LANGUAGE_KEY}
    return protocol.DistillRequest(job_id=run.run_id, owner=str(run.created_by), attempt=run.attempt,
                                   options=protocol.DistillSettings(**settings))


def mix_text(mix: list[Any]) -> str:
    """``ink-style:0.8, hero-a`` from stored mix entries (dicts or [name, weight] pairs)."""
    parts = []
    for item in mix or []:
        name, weight = (item.get("name"), item.get("weight")) if isinstance(item, dict) else item
        parts.append(f"{name}:{weight:g}" if weight is not None else str(name))
    return ", ".join(parts) or "(the base alone)"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "—"


def verdict(run: RunRow) -> Text:
    """The end of a completed run: the judge's numbers, its recommendation, and what fast mode now runs."""
    result = run.result
    report = result.get("report") or {}
    stock = report.get("distance_stock", report.get("stock"))
    numbers = _("Distance to the teacher at %(steps)s steps: before %(before)s, stock adapter %(stock)s, after "
                "%(after)s (gain %(gain)s; below 1 is closer).",
                steps=run.options.get("student_steps") or 4, before=_number(report.get("distance_before")),
                stock=_number(stock), after=_number(report.get("distance_after")),
                gain=_number(report.get("distill_gain")))
    recommended = _why(result.get("recommended"), report.get("distance_before"), report.get("distance_after"), stock)
    mix = mix_text(result.get("mix") or run.options.get("mix"))
    if result.get("installed"):
        after = _("Installed: /imagine fast: with the mix %(mix)s now uses **%(name)s**.", mix=mix,
                  name=result["installed"])
    elif run.options.get("install") == "never":
        after = _("Not installed (install: never): fast mode is unchanged; the adapter stays in the run folder.")
    else:
        after = _("Not installed, so fast mode keeps the stock adapter for %(mix)s; run it again with install: "
                  "always to use it anyway.", mix=mix)
    return _("%(numbers)s\n%(recommended)s\n%(after)s", numbers=numbers, recommended=recommended, after=after)


def _why(recommended: Any, before: Any, after: Any, stock: Any) -> Text:
    """The judge's verdict in words: closer than before and, when there is one, than the stock adapter."""
    if recommended:
        if isinstance(stock, (int, float)):
            return _("Recommended: it keeps the mix's look closer than before and than the stock adapter.")
        return _("Recommended: it keeps the mix's look closer than before.")
    numbers = all(isinstance(v, (int, float)) for v in (before, after, stock))
    if numbers and after < before and after >= stock:
        return _("Not recommended: it is closer to the teacher than before, but not closer than the stock adapter.")
    return _("Not recommended: it is no closer to the teacher than before.")


def notice_text(run: RunRow, status: str) -> Text:
    """What the admin who started a run is told when it ends."""
    if status == "completed":
        return _("✅ Distillation run `%(run_id)s` (**%(name)s**) completed.\n%(verdict)s", run_id=run.run_id,
                 name=run.adapter_name, verdict=verdict(run))
    if status == "canceled":
        return _("✖️ Distillation run `%(run_id)s` (**%(name)s**) was canceled; fast mode is unchanged.",
                 run_id=run.run_id, name=run.adapter_name)
    return _("❌ Distillation run `%(run_id)s` (**%(name)s**) failed: %(error)s. Fast mode is unchanged.",
             run_id=run.run_id, name=run.adapter_name, error=run.error or "unknown error")


def live_message(run: RunRow, run_dir: Path, eta: str, language: str | None = None
                 ) -> tuple[str | None, discord.Embed, list[discord.File]]:
    """Content, embed and files of the run's live status message (reads the run folder: call in a thread).

    The message is the channel's: ``language`` is the server's (as for training runs)."""
    from bot.training_views import _bar, _file, latest_grid

    def t(message: Text) -> str:
        return localize(message, language)

    embed = discord.Embed(title=t(_("Distillation run %(run_id)s", run_id=run.run_id)), colour=embeds.COLOR)
    embed.add_field(name=t(_("Adapter")), value=t(_("**%(name)s** (few-step, lcm) for the mix %(mix)s",
                                                   name=run.adapter_name, mix=mix_text(run.options.get("mix")))),
                    inline=False)
    embed.add_field(name=t(_("Status")), value=run.status)
    total = run.progress_total or int(run.options.get("steps") or 0)
    bar = _bar(run.progress_step, total)
    embed.add_field(name=t(_("Progress")), value=f"step {run.progress_step}/{total}\n`{bar}`")
    embed.add_field(name=t(_("Loss")), value=f"{run.loss:.4f}" if run.loss is not None else "—")
    embed.add_field(name="ETA", value=eta)
    if run.error:
        embed.add_field(name=t(_("Error")), value=embeds.truncate(run.error, 1024), inline=False)
    files = []
    if (run_dir / "loss.png").is_file():
        files.append(_file(run_dir / "loss.png", "loss.png"))
    grid = latest_grid(run_dir)  # teacher / stock / distilled on fixed seeds, at each checkpoint
    if grid is not None:
        files.append(_file(grid[1], f"samples-step-{grid[0]}.png"))
        embed.set_image(url=f"attachment://samples-step-{grid[0]}.png")
    embed.set_footer(text=t(_("dataset %(dataset)s · teacher CFG %(cfg)s", dataset=run.dataset or "—",
                              cfg=run.options.get("teacher_cfg") or "default")))
    content = None
    if run.status == "completed":
        content = t(verdict(run))
        if run.promoted_as:
            content += "\n" + t(_("✅ Installed by an admin as **%(name)s**: /imagine fast: with this mix now uses "
                                   "it.", name=run.promoted_as))
    elif run.status in ("failed", "canceled"):
        content = t(_("Distillation run `%(run_id)s` %(status)s; fast mode is unchanged.", run_id=run.run_id,
                      status=run.status))
    return content, embed, files


async def start(bot: "ArcaeBot", flow: "TrainingFlow", interaction: discord.Interaction,
                settings: protocol.DistillSettings) -> None:
    """Record the run, post its live message, send it to the engine, and tell the admin (deferred here)."""
    from bot.job_manager import new_job_id
    from engine.contract.transport import EngineRejected, EngineUnavailable

    cog = bot.get_cog("Training")
    active = await flow.store.active()
    if active:
        raise Refused(_("Run `%(run_id)s` (**%(name)s**) is still being trained; one run at a time. Wait for it, "
                        "or stop it with /train cancel.", run_id=active[0].run_id, name=active[0].adapter_name))
    await interaction.response.defer(ephemeral=True, thinking=True)
    run_id = f"distill-{new_job_id()}"
    options = {**settings.model_dump(mode="json", exclude_none=True), LANGUAGE_KEY: interaction_language(interaction)}
    await flow.store.insert(run_id=run_id, adapter_name=settings.name, kind=DISTILL_KIND, trigger="",
                            dataset=settings.dataset or "", run_dir=str(flow.runs_dir / run_id), options=options,
                            created_by=interaction.user.id, channel_id=interaction.channel_id,
                            guild_id=interaction.guild_id)
    await flow.store.audit(user_id=interaction.user.id, guild_id=interaction.guild_id, action="adapter.distill",
                           target=run_id, detail=options)
    run = await flow.store.get(run_id)
    assert run is not None
    status = None
    if cog is not None:
        cog.notify_when_done(run_id, interaction)
        status = await cog.live.post(run, interaction.channel_id) if interaction.channel_id else None
    lines = [_("⚗️ Distillation run `%(run_id)s` for **%(name)s** (mix %(mix)s, %(steps)s steps) started.",
               run_id=run_id, name=settings.name, mix=mix_text(options.get("mix")), steps=settings.steps)]
    try:
        await flow.submit(run)
    except EngineRejected as exc:
        await flow.store.finish(run_id, "failed", error=exc.message)
        flow.changed(run_id)
        lines = [_("❌ The engine refused distillation run `%(run_id)s`: %(reason)s", run_id=run_id,
                   reason=exc.message)]
    except EngineUnavailable:
        lines.append(_("The engine is not reachable right now; the run starts when it is back."))
    if status is not None:
        lines.append(_("Live status: %(url)s", url=status.jump_url))
    language = interaction_language(interaction)
    await interaction.followup.send(embeds.truncate("\n".join(localize(x, language) for x in lines), 2000),
                                    ephemeral=True)


async def install_anyway(flow: "TrainingFlow", interaction: discord.Interaction, row: RunRow, audit: Any,
                         go_live: Any) -> None:
    """Make a completed distillation's adapter live although its run did not install it (not recommended,
    or install: never): versioned like any promotion (``training.data.lifecycle``), so /adapter rollback
    undoes it; the file's header keeps the mix binding."""
    import asyncio

    from engine.contract.training_errors import TrainingError
    from training.data import lifecycle

    if row.status != "completed":
        raise Refused(_("Distillation run `%(run_id)s` is %(status)s; only a completed one can be installed.",
                        run_id=row.run_id, status=row.status))
    if row.result.get("installed") or row.promoted_as:
        raise Refused(_("The adapter of distillation run `%(run_id)s` is already live as **%(name)s**.",
                        run_id=row.run_id, name=row.result.get("installed") or row.promoted_as))
    await interaction.response.defer(ephemeral=True, thinking=True)
    mix = mix_text(row.result.get("mix") or row.options.get("mix"))
    try:
        result = await asyncio.to_thread(
            lifecycle.promote, flow.run_dir(row), None, row.adapter_name, flow.adapters_dir, kind="lcm", triggers=[],
            default_weight=1.0, description=f"few-step adapter distilled for the mix {mix}")
    except TrainingError as exc:
        raise InvalidOption(exc.message) from None
    await flow.store.set_promoted(row.run_id, row.adapter_name)
    flow.changed(row.run_id)  # the run's status message drops its button
    await audit(interaction, "adapter.promote", row.adapter_name, run=row.run_id, version=result.version,
                previous=result.previous, distilled=True)
    warning = await go_live(interaction)
    text = tr(interaction, "✅ **%(name)s** v%(version)s is live: /imagine fast: with the mix %(mix)s now uses it "
              "(installed by an admin; the run did not install it).", name=row.adapter_name,
              version=result.version, mix=mix)
    await interaction.followup.send(text + warning, ephemeral=True)
