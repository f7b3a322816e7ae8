"""/train: LoRA training from Discord (admins only; every action audit-logged).

``start`` (images as attachments or a .zip -> captioned dataset -> a run on the engine's GPU
worker, between generation jobs, followed by a live status message in the channel:
``bot.training_live``), ``add-images``, ``captions`` (per-image tags, the tag chart,
edits by uploading .txt files), ``status`` (progress, ETA, loss plot, latest sample grid),
``cancel``, ``checkpoints`` (score table and sample grids; choose one). The work behind the
commands lives in ``bot.training_flow``; this module is the Discord side.

Hidden from members by default permissions, and checked server-side with ``require_admin``
on every command (a server owner can re-grant hidden commands to anyone).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.distill_flow import DISTILL_KIND, notice_text
from bot.errors import InvalidOption, Refused
from bot.i18n import _, guild_language, interaction_language, localize
from bot.job_manager import new_job_id
from bot.policy import is_admin, require_admin
from bot.replies import report_error
from bot.training_live import LiveStatus, RunButton
from bot.training_flow import TrainingFlow, flow_for
from bot.training_intake import (IMAGE_HELP, attachment_list, check_adapter_name, check_caption_uploads,
                                 check_uploads, download, refused_summary)
from bot.training_store import RunRow
from engine.contract import protocol

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)

KINDS = [app_commands.Choice(name=k, value=k) for k in ("character", "style")]
MAX_GRIDS = 8


def eta_text(run: RunRow, now: float | None = None, language: str | None = None) -> str:
    """Remaining time from the pace so far (steps done since the run started)."""
    if run.status != "running" or not run.started_at or run.progress_step <= 0:
        return "—"
    elapsed = (now or time.time()) - run.started_at
    left = elapsed / run.progress_step * max(0, run.progress_total - run.progress_step)
    if left >= 60:
        return _("~%(min)s min %(s)s s", min=int(left // 60), s=int(left % 60)).render(language)
    return _("~%(s)s s", s=int(left)).render(language)


def run_choices(runs: list[RunRow], current: str) -> list[app_commands.Choice[str]]:
    current = current.lower()
    out = []
    for r in runs:
        label = f"{r.run_id} · {r.adapter_name} · {r.status}"
        if current in label.lower():
            out.append(app_commands.Choice(name=label[:100], value=r.run_id))
    return out[:25]


class Training(commands.Cog):
    """The /train command group."""

    admin_only = True  # its commands are registered to the home servers only (bot.app)

    train = app_commands.Group(name="train", description="Train LoRA adapters from images (admins)",
                               guild_only=True, default_permissions=discord.Permissions(manage_guild=True))

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot
        self.flow: TrainingFlow = flow_for(bot)
        self.flow.notice = self._notice
        self.live = LiveStatus(bot, self.flow)
        self.flow.on_change = self.live.touch
        self._interactions: dict[str, discord.Interaction] = {}
        self._starting = asyncio.Lock()

    async def cog_load(self) -> None:
        # Engine events and reconnects reach the flow through JobManager's listeners.
        await self.flow.start()
        # Cancel/Promote on status messages of any age ("arcae-run:<action>:<run>").
        self.bot.add_dynamic_items(RunButton)
        await self.live.start()

    async def cog_unload(self) -> None:
        await self.live.stop()
        await self.flow.stop()

    # ------------------------------------------------------------------ helpers

    async def _run(self, interaction: discord.Interaction, run_id: Optional[str], *,
                   statuses: tuple[str, ...] | None = None,
                   none: object = _("No training run yet; start one with /train start.")) -> RunRow:
        """A run of this server (another server's runs are not shown, even by id)."""
        store = self.flow.store
        run = await store.get(run_id) if run_id else await store.latest(statuses, guild_id=interaction.guild_id)
        if run is not None and run.guild_id != interaction.guild_id:
            run = None
        if run is None:
            raise InvalidOption(_("No training run `%(run_id)s` (see /train status).", run_id=run_id) if run_id else none)
        return run

    async def _autocomplete_runs(self, interaction: discord.Interaction,
                                 current: str) -> list[app_commands.Choice[str]]:
        if not is_admin(interaction.user, interaction.guild, self.bot.config):
            return []
        return run_choices(await self.flow.store.recent(guild_id=interaction.guild_id), current)

    async def _autocomplete_datasets(self, interaction: discord.Interaction,
                                     current: str) -> list[app_commands.Choice[str]]:
        if not is_admin(interaction.user, interaction.guild, self.bot.config):
            return []
        return await self.flow.dataset_choices(current)

    async def _audit(self, interaction: discord.Interaction, action: str, target: str, **detail: Any) -> None:
        await self.flow.store.audit(user_id=interaction.user.id, guild_id=interaction.guild_id, action=action,
                                    target=target, detail=detail)

    def notify_when_done(self, run_id: str, interaction: discord.Interaction) -> None:
        """Tell the admin of ``interaction`` when run ``run_id`` ends (a follow-up while it is valid)."""
        self._interactions[run_id] = interaction

    async def _notice(self, run: RunRow, status: str) -> None:
        """Tell the admin who started a run that it ended (ephemeral follow-up, else the channel)."""
        names = {"run_id": run.run_id, "name": run.adapter_name}
        if run.kind == DISTILL_KIND:
            text = notice_text(run, status)  # a Text: rendered in the admin's language below
        elif status == "completed":
            rec = _("recommended checkpoint: step %(step)s", step=run.recommended_step) if run.recommended_step \
                else _("no scores")
            loss = _(", loss %(loss)s", loss=f"{run.loss:.4f}") if run.loss is not None else ""
            text = _("✅ Training run `%(run_id)s` (**%(name)s**) completed: %(steps)s steps%(loss)s; %(rec)s. See "
                     "/train checkpoints, then /adapter promote.", steps=run.progress_step, loss=loss, rec=rec, **names)
        elif status == "canceled":
            text = _("✖️ Training run `%(run_id)s` (**%(name)s**) was canceled; live adapters are unchanged.", **names)
        else:
            text = _("❌ Training run `%(run_id)s` (**%(name)s**) failed: %(error)s. Live adapters are unchanged.",
                     error=run.error or _("unknown error"), **names)
        interaction = self._interactions.pop(run.run_id, None)
        if interaction is not None:
            try:
                await interaction.followup.send(localize(text, interaction_language(interaction))[:2000],
                                                ephemeral=True)
                return
            except discord.HTTPException:
                pass  # the interaction expired (15 minutes): say it in the channel instead
        channel = self.bot.get_channel(run.channel_id) if run.channel_id else None
        if channel is not None:
            language = guild_language(getattr(channel, "guild", None))
            await channel.send(f"<@{run.created_by}> {text.render(language)}"[:2000],
                               allowed_mentions=discord.AllowedMentions(users=True))

    # ------------------------------------------------------------------ start

    @train.command(name="start", description="Train a LoRA from attached images or a .zip (admins)")
    @app_commands.describe(
        name="Adapter (and dataset) name: letters, digits, _ . -", kind="What the adapter learns",
        trigger="Trigger word the captions start with", image1="An image, or a .zip of images",
        steps="Optimizer steps (default and cap from config)", rank="LoRA rank (capped by config)",
        lr="Learning rate, e.g. 0.0001", resolution="Training resolution in px (capped by config)",
        save_every="Checkpoint every N steps (at least the configured minimum)", seed="Seed (same seed, same run)",
        sample_steps="Sampling steps of checkpoint sample images (capped by config)")
    @app_commands.choices(kind=KINDS)
    async def start(self, interaction: discord.Interaction, name: str, kind: str, trigger: str,
                    image1: Optional[discord.Attachment] = None, image2: Optional[discord.Attachment] = None,
                    image3: Optional[discord.Attachment] = None, image4: Optional[discord.Attachment] = None,
                    image5: Optional[discord.Attachment] = None, image6: Optional[discord.Attachment] = None,
                    image7: Optional[discord.Attachment] = None, image8: Optional[discord.Attachment] = None,
                    image9: Optional[discord.Attachment] = None, image10: Optional[discord.Attachment] = None,
                    steps: Optional[int] = None, rank: Optional[int] = None, lr: Optional[float] = None,
                    resolution: Optional[int] = None, save_every: Optional[int] = None, seed: Optional[int] = None,
                    sample_steps: Optional[int] = None) -> None:
        require_admin(interaction, self.bot.config)
        flow, config = self.flow, self.bot.config
        attachments = attachment_list(image1, image2, image3, image4, image5, image6, image7, image8, image9, image10)
        check_adapter_name(name)
        dataset = flow.datasets_dir / name
        options = flow.build_options(dataset=dataset, kind=kind, trigger=trigger, steps=steps, rank=rank, lr=lr,
                                     resolution=resolution, save_every=save_every, seed=seed,
                                     sample_steps=sample_steps)
        exists = (dataset / "manifest.json").is_file()
        if not attachments and not exists:
            raise InvalidOption(_("Not started: no images and no dataset `%(name)s` yet; %(help)s.", name=name,
                                  help=IMAGE_HELP))
        if attachments and exists:
            raise Refused(_("A dataset named `%(name)s` already exists. Run /train start without images to train on "
                            "it again, or add images with /train add-images.", name=name))
        check_uploads(attachments, config.intake.max_upload_bytes)
        active = await flow.store.active()
        if active or self._starting.locked():
            busy = f"`{active[0].run_id}` (**{active[0].adapter_name}**)" if active else _("another one")
            raise Refused(_("Training run %(busy)s is still being prepared or trained; one run at a time. Wait for "
                            "it, or stop it with /train cancel.", busy=busy))
        async with self._starting:
            await interaction.response.defer(ephemeral=True, thinking=True)
            await self._start_run(interaction, name, kind, trigger, attachments, options)

    async def _start_run(self, interaction: discord.Interaction, name: str, kind: str, trigger: str,
                         attachments: list[discord.Attachment], options: dict[str, Any]) -> None:
        from engine.contract.transport import EngineRejected, EngineUnavailable

        flow, language = self.flow, interaction_language(interaction)
        report_lines = []
        if attachments:
            files = await download(attachments)
            result = await flow.import_images(name, kind, trigger, files)
            report = result.report
            report_lines.append(_("%(n)s image(s) captioned into dataset `%(name)s`.", n=len(report.images),
                                  name=name).render(language))
            if report.refused:
                report_lines.append(_("Refused %(n)s file(s):", n=len(report.refused)).render(language) + "\n"
                                    + refused_summary(report.refused, language))
        else:
            report_lines.append(_("Training again on dataset `%(name)s`.", name=name).render(language))
        run_id = f"run-{new_job_id()}"
        await flow.store.insert(run_id=run_id, adapter_name=name, kind=kind, trigger=trigger, dataset=name,
                                run_dir=str(flow.runs_dir / run_id), options=options,
                                created_by=interaction.user.id, channel_id=interaction.channel_id,
                                guild_id=interaction.guild_id)
        await self._audit(interaction, "train.start", run_id, adapter=name, kind=kind, trigger=trigger,
                          files=[a.filename for a in attachments], options=options)
        run = await flow.store.get(run_id)
        assert run is not None
        self._interactions[run_id] = interaction
        status = await self.live.post(run, interaction.channel_id) if interaction.channel_id else None
        if status is not None:
            report_lines.append(_("Live status: %(url)s", url=status.jump_url).render(language))
        try:
            await flow.submit(run)
        except EngineRejected as exc:
            self._interactions.pop(run_id, None)
            await flow.store.finish(run_id, "failed", error=exc.message)
            flow.changed(run_id)
            await interaction.followup.send(_("❌ The engine refused training run `%(run_id)s`: %(reason)s",
                                              run_id=run_id, reason=exc.message).render(language), ephemeral=True)
            return
        except EngineUnavailable:
            report_lines.append(_("The engine is not reachable right now; the run starts when it is back.")
                                .render(language))
        follow = _("Follow it with /train status or the live status message.") if status is not None else \
            _("Follow it with /train status.")
        report_lines.append(_("Steps %(steps)s, rank %(rank)s. %(follow)s",
                              steps=options.get("steps", self.bot.config.training.steps),
                              rank=options.get("rank", self.bot.config.training.rank), follow=follow).render(language))
        head = _("🏋️ Training run `%(run_id)s` for **%(name)s** (%(kind)s, trigger `%(trigger)s`) started.",
                 run_id=run_id, name=name, kind=_(kind), trigger=trigger).render(language)
        await interaction.followup.send(embeds.truncate(head + "\n" + "\n".join(report_lines), 2000), ephemeral=True)

    # ------------------------------------------------------------------ datasets

    @train.command(name="add-images", description="Add images to a dataset before (re)training it (admins)")
    @app_commands.describe(dataset="Dataset name (the adapter name of /train start)", image1="An image or a .zip")
    async def add_images(self, interaction: discord.Interaction, dataset: str,
                         image1: discord.Attachment, image2: Optional[discord.Attachment] = None,
                         image3: Optional[discord.Attachment] = None, image4: Optional[discord.Attachment] = None,
                         image5: Optional[discord.Attachment] = None, image6: Optional[discord.Attachment] = None,
                         image7: Optional[discord.Attachment] = None, image8: Optional[discord.Attachment] = None,
                         image9: Optional[discord.Attachment] = None,
                         image10: Optional[discord.Attachment] = None) -> None:
        require_admin(interaction, self.bot.config)
        from training.data.dataset_folder import read_manifest

        attachments = attachment_list(image1, image2, image3, image4, image5, image6, image7, image8, image9, image10)
        manifest = self._manifest(dataset, read_manifest)
        check_uploads(attachments, self.bot.config.intake.max_upload_bytes)
        if any(r.dataset == dataset for r in await self.flow.store.active()):
            raise Refused(_("Dataset `%(dataset)s` is being trained on; add images once the run has ended.",
                            dataset=dataset))
        await interaction.response.defer(ephemeral=True, thinking=True)
        new = await download(attachments)
        result = await self.flow.add_images(dataset, manifest.get("kind", "character"),
                                            manifest.get("trigger", ""), new)
        added = len(result.report.images)
        await self._audit(interaction, "train.add_images", dataset, files=[a.filename for a in attachments],
                          added=added)
        language = interaction_language(interaction)
        text = _("Added %(n)s image(s) to dataset `%(dataset)s` (now %(total)s).", n=added, dataset=dataset,
                 total=len(result.manifest["images"])).render(language)
        refused = result.report.refused
        if refused:
            text += "\n" + _("Refused %(n)s file(s):", n=len(refused)).render(language) + "\n" + \
                refused_summary(refused, language)
        await interaction.followup.send(embeds.truncate(text, 2000), ephemeral=True)

    def _manifest(self, dataset: str, read_manifest: Any) -> dict[str, Any]:
        folder = self.flow.datasets_dir / dataset
        if not re.fullmatch(protocol.ADAPTER_NAME_PATTERN[1:-1], dataset) or not folder.is_dir():
            known = ", ".join(self.flow.datasets()[:20]) or _("none yet")
            raise InvalidOption(_("No dataset `%(dataset)s`. Datasets: %(known)s.", dataset=dataset, known=known))
        try:
            return read_manifest(folder)
        except ValueError as exc:
            raise InvalidOption(_("Dataset `%(dataset)s` is unreadable: %(error)s", dataset=dataset,
                                  error=exc)) from None

    @train.command(name="captions", description="Per-image captions and the tag chart; upload .txt files to edit")
    @app_commands.describe(dataset="Dataset name", image="Show one image's tags and scores",
                           file1="NAME.txt replacing the caption of NAME.png (up to 5 files)")
    async def captions(self, interaction: discord.Interaction, dataset: str, image: Optional[str] = None,
                       file1: Optional[discord.Attachment] = None, file2: Optional[discord.Attachment] = None,
                       file3: Optional[discord.Attachment] = None, file4: Optional[discord.Attachment] = None,
                       file5: Optional[discord.Attachment] = None) -> None:
        require_admin(interaction, self.bot.config)
        from training.data.dataset_folder import read_manifest

        manifest = self._manifest(dataset, read_manifest)
        uploads = attachment_list(file1, file2, file3, file4, file5)
        check_caption_uploads(uploads)  # like /train start: nothing is downloaded before its checks
        await interaction.response.defer(ephemeral=True, thinking=True)
        if uploads:
            await self._edit_captions(interaction, dataset, manifest, uploads)
            return
        from bot.training_views import caption_page

        text, files = await asyncio.to_thread(caption_page, self.flow.datasets_dir / dataset, manifest, image,
                                              interaction_language(interaction))
        await interaction.followup.send(embeds.truncate(text, 2000), files=files, ephemeral=True)

    async def _edit_captions(self, interaction: discord.Interaction, dataset: str, manifest: dict[str, Any],
                             uploads: list[discord.Attachment]) -> None:
        from bot.training_views import write_captions

        files = await download(uploads)
        updated, refused = await asyncio.to_thread(write_captions, self.flow.datasets_dir / dataset, manifest, files)
        await self._audit(interaction, "train.captions", dataset, updated=updated,
                          refused=[f"{n}: {r}" for n, r in refused])
        head = _("Updated %(n)s caption(s) in `%(dataset)s`: %(files)s", n=len(updated), dataset=dataset,
                 files=", ".join(updated)) if updated else _("Updated no captions in `%(dataset)s`.", dataset=dataset)
        lines = [head.render(interaction_language(interaction))]
        lines += [f"• `{n}`: {r.render(interaction_language(interaction))}" for n, r in refused]
        await interaction.followup.send(embeds.truncate("\n".join(lines), 2000), ephemeral=True)

    # ------------------------------------------------------------------ following a run

    @train.command(name="status", description="Progress, ETA, loss plot and latest samples of a run (admins)")
    @app_commands.describe(run="Run id (default: the newest run)")
    async def status(self, interaction: discord.Interaction, run: Optional[str] = None) -> None:
        require_admin(interaction, self.bot.config)
        row = await self._run(interaction, run)
        await interaction.response.defer(ephemeral=True, thinking=True)
        from bot.training_views import status_embed

        language = interaction_language(interaction)
        embed, files = await asyncio.to_thread(status_embed, row, self.flow.run_dir(row),
                                               eta_text(row, language=language), language)
        await interaction.followup.send(embed=embed, files=files, ephemeral=True)

    @train.command(name="cancel", description="Stop a training run; live adapters stay as they are (admins)")
    @app_commands.describe(run="Run id (default: the active run)")
    async def cancel(self, interaction: discord.Interaction, run: Optional[str] = None) -> None:
        require_admin(interaction, self.bot.config)
        row = await self._run(interaction, run, statuses=("pending", "running"),
                              none=_("No training run is being trained now."))
        await self.cancel_run(interaction, row)

    async def cancel_run(self, interaction: discord.Interaction, row: RunRow) -> None:
        """Stop an active run (the /train cancel command and the Cancel button)."""
        if not row.active:
            raise Refused(_("Training run `%(run_id)s` has already ended (%(status)s).", run_id=row.run_id,
                            status=_(row.status)))
        await interaction.response.defer(ephemeral=True, thinking=True)
        self._interactions.pop(row.run_id, None)  # this reply says it; no separate notice
        held = await self.flow.cancel(row)
        await self._audit(interaction, "train.cancel", row.run_id, adapter=row.adapter_name, held=held)
        await interaction.followup.send(_("✖️ Canceling training run `%(run_id)s` (**%(name)s**). Live adapters "
                                          "are unchanged.", run_id=row.run_id, name=row.adapter_name)
                                        .render(interaction_language(interaction)), ephemeral=True)

    @train.command(name="checkpoints", description="Checkpoint scores and sample grids; choose one (admins)")
    @app_commands.describe(run="Run id (default: the newest run)", choose="Make this checkpoint step the one to "
                           "promote")
    async def checkpoints(self, interaction: discord.Interaction, run: Optional[str] = None,
                          choose: Optional[int] = None) -> None:
        require_admin(interaction, self.bot.config)
        row = await self._run(interaction, run)
        await interaction.response.defer(ephemeral=True, thinking=True)
        from bot.training_views import checkpoint_page, choose_step
        from training.data.run_record import read_run

        run_dir = self.flow.run_dir(row)
        if choose is not None:
            await asyncio.to_thread(choose_step, run_dir, choose)
            await self.flow.store.set_chosen(row.run_id, choose)
            await self._audit(interaction, "train.choose", row.run_id, step=choose)
        try:
            record = await asyncio.to_thread(read_run, run_dir)
        except Exception:
            record = {}
        if row.status == "completed" and not record.get("scores"):
            await self.flow.score(row)
            record = await asyncio.to_thread(read_run, run_dir)
        language = interaction_language(interaction)
        text, files = await asyncio.to_thread(checkpoint_page, row, run_dir, record, MAX_GRIDS, language)
        if choose is not None:
            text = _("Chose checkpoint step %(step)s of `%(run_id)s`; /adapter promote uses it.", step=choose,
                     run_id=row.run_id).render(language) + "\n" + text
        await interaction.followup.send(embeds.truncate(text, 2000), files=files, ephemeral=True)

    async def run_button(self, interaction: discord.Interaction, action: str, run_id: str) -> None:
        """Cancel or Promote pressed on a run's live status message: admins of this home server only."""
        try:
            require_admin(interaction, self.bot.config)
            row = await self._run(interaction, run_id)
            if interaction.message is None or interaction.message.id != row.status_message_id:
                raise Refused(_("This button does not belong to training run `%(run_id)s`; use the buttons on "
                                "that run's own status message.", run_id=run_id))
            if action == "cancel":
                await self.cancel_run(interaction, row)
                return
            if row.promoted_as:
                raise Refused(_("Training run `%(run_id)s` was already promoted as **%(name)s**; promote another "
                                "checkpoint with /adapter promote.", run_id=row.run_id, name=row.promoted_as))
            await self.bot.get_cog("AdapterAdmin").promote_run(interaction, row)  # type: ignore[union-attr]
        except Exception as exc:
            await report_error(interaction, exc)

    for _command in (status, cancel, checkpoints):
        _command.autocomplete("run")(_autocomplete_runs)
    for _command in (add_images, captions):
        _command.autocomplete("dataset")(_autocomplete_datasets)
    del _command


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(Training(bot))
