"""A training run's live status: one channel message per run that edits itself until the run ends.

``/train start`` posts it in the channel it was run in (a home server's: /train exists only
there). Every change of the run's row (engine progress, the end) marks the run dirty; the
message is edited at most once per ``[training] status_edit_interval_s``, with the newest row,
so a fast run never exceeds Discord's edit rate limits. While the run is active the message shows
step, ETA, loss, the loss curve and the newest sample grid (both re-uploaded only when the trainer
wrote new ones, at checkpoints) and a Cancel button; when it ends, the checkpoint table and a
Promote button for the chosen (else recommended) checkpoint. Both buttons are persistent
(``RunButton``) and admin-only: the /train cog checks ``require_admin`` on every press.

The message's id is kept in ``training_runs`` (migration 0014) and the time of its final edit too,
so after a bot restart the message keeps updating, and a run that ended while the bot was down
still gets its final edit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from bot.distill_flow import DISTILL_KIND
from bot.i18n import N_, _, guild_language
from bot.training_store import RunRow

if TYPE_CHECKING:
    from bot.app import ArcaeBot
    from bot.training_flow import TrainingFlow

log = logging.getLogger(__name__)

BUTTONS: dict[str, tuple[str, discord.ButtonStyle, str]] = {
    "cancel": (N_("Cancel run"), discord.ButtonStyle.danger, "✖️"),
    "promote": (N_("Promote"), discord.ButtonStyle.success, "🚀"),
}


class RunButton(discord.ui.DynamicItem[discord.ui.Button[Any]],
                template=r"arcae-run:(?P<action>cancel|promote):(?P<run_id>[A-Za-z0-9_\-]{1,80})"):
    """Cancel or Promote on a run's status message; the /train cog handles the press (admins only)."""

    def __init__(self, action: str, run_id: str, label: str | None = None) -> None:
        name, style, emoji = BUTTONS[action]
        super().__init__(discord.ui.Button(label=label or name, style=style, emoji=emoji,
                                           custom_id=f"arcae-run:{action}:{run_id}"))
        self.action = action
        self.run_id = run_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: Any) -> "RunButton":
        return cls(match["action"], match["run_id"])

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = interaction.client.get_cog("Training")  # type: ignore[attr-defined]
        await cog.run_button(interaction, self.action, self.run_id)


def promote_step(run: RunRow) -> int | None:
    """The checkpoint the Promote button (like /adapter promote) makes live: chosen, else recommended."""
    return run.chosen_step or run.recommended_step


def run_view(run: RunRow, language: str | None = None) -> discord.ui.View | None:
    """Cancel while the run is active; Promote once it completed (until it is promoted)."""
    view = discord.ui.View(timeout=None)
    if run.active:
        view.add_item(RunButton("cancel", run.run_id, label=_(BUTTONS["cancel"][0]).render(language)))
    elif run.kind == DISTILL_KIND:  # a distillation the engine did not install: an admin may install it anyway
        if run.status == "completed" and not run.promoted_as and not run.result.get("installed"):
            view.add_item(RunButton("promote", run.run_id, label=_("Install anyway").render(language)))
    elif run.status == "completed" and not run.promoted_as:
        step = promote_step(run)
        label = _("Promote step %(step)s", step=step) if step is not None else _("Promote final adapter")
        view.add_item(RunButton("promote", run.run_id, label=label.render(language)))
    return view if view.children else None


def _attachments_key(run_dir: Path) -> tuple[Any, ...]:
    """What the attached pictures depend on: the loss plot's and the newest grid's files."""
    from bot.training_views import latest_grid

    loss = run_dir / "loss.png"
    grid = latest_grid(run_dir)
    loss_stat = loss.stat() if loss.is_file() else None
    return (loss_stat and (loss_stat.st_mtime_ns, loss_stat.st_size), grid and grid[0])


def render(run: RunRow, run_dir: Path, language: str | None = None
           ) -> tuple[str | None, discord.Embed, list[discord.File], tuple[Any, ...]]:
    """Content, embed, files and their key for the run's message (reads the run folder: call in a thread)."""
    from bot.cogs.training import eta_text
    from bot.training_views import checkpoint_page, status_embed

    key = _attachments_key(run_dir)
    if run.kind == DISTILL_KIND:  # a distillation run: its own embed and verdict, the same message life
        from bot.distill_flow import live_message

        content, embed, files = live_message(run, run_dir, eta_text(run, language=language), language)
        return content, embed, files, key
    embed, files = status_embed(run, run_dir, eta_text(run, language=language), language)
    content = None
    if run.status == "completed":
        from training.data.run_record import read_run

        try:
            record = read_run(run_dir)
        except Exception:  # unreadable record: the table falls back to the step list
            record = {}
        content, extra = checkpoint_page(run, run_dir, record, 0, language)
        files += extra  # scores.txt when the table is too long for the message
        key += (len(extra),)
    elif run.status in ("failed", "canceled"):
        content = _("Training run `%(run_id)s`: %(status)s; live adapters are unchanged.", run_id=run.run_id,
                    status=_(run.status)).render(language)
    if run.promoted_as:
        promoted = _("✅ Promoted as **%(name)s** (see /adapter info).", name=run.promoted_as).render(language)
        content = f"{content or ''}\n{promoted}".strip()
    return content, embed, files, key


class LiveStatus:
    """The live status messages of training runs (see the module docstring)."""

    def __init__(self, bot: "ArcaeBot", flow: "TrainingFlow") -> None:
        self.bot = bot
        self.flow = flow
        self.interval = bot.config.training.status_edit_interval_s
        self._dirty: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last: dict[str, float] = {}
        self._attached: dict[str, tuple[Any, ...]] = {}

    async def start(self) -> None:
        """Pick up the messages of runs followed before a restart (active ones, or ended meanwhile)."""
        for run in await self.flow.store.followed():
            self.touch(run.run_id)

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    def _language(self, run: RunRow) -> str | None:
        """The message is the channel's, read by the server's admins: it speaks the server's language."""
        return guild_language(self.bot.get_guild(run.guild_id) if run.guild_id else None)

    async def post(self, run: RunRow, channel_id: int) -> discord.Message | None:
        """Post the run's message in ``channel_id``; None (logged) when the bot may not post there."""
        run_dir, language = self.flow.run_dir(run), self._language(run)
        content, embed, files, key = await asyncio.to_thread(render, run, run_dir, language)
        channel = self.bot.get_partial_messageable(channel_id, guild_id=run.guild_id)
        try:
            message = await channel.send(content=content, embed=embed, files=files, view=run_view(run, language),
                                         allowed_mentions=discord.AllowedMentions.none())
        except discord.HTTPException as exc:
            log.warning("training run %s: no live status message in channel %s (%s)", run.run_id, channel_id, exc)
            return None
        await self.flow.store.set_status_message(run.run_id, channel_id, message.id)
        self._attached[run.run_id] = key
        self._last[run.run_id] = time.monotonic()
        self.touch(run.run_id)  # events that came while posting
        return message

    def touch(self, run_id: str) -> None:
        """The run changed: edit its message now, or when the edit interval allows."""
        self._dirty.add(run_id)
        if run_id not in self._tasks:
            self._tasks[run_id] = asyncio.create_task(self._follow(run_id))

    async def _follow(self, run_id: str) -> None:
        try:
            while run_id in self._dirty:
                wait = self._last.get(run_id, float("-inf")) + self.interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._dirty.discard(run_id)  # changes from now on need another edit
                try:
                    await self._update(run_id)
                except Exception:  # Discord or disk trouble: the next change tries again
                    log.exception("training run %s: live status edit failed", run_id)
                self._last[run_id] = time.monotonic()
        finally:
            self._tasks.pop(run_id, None)

    async def _update(self, run_id: str) -> None:
        run = await self.flow.store.get(run_id)
        if run is None or run.status_message_id is None or run.status_channel_id is None:
            return
        language = self._language(run)
        content, embed, files, key = await asyncio.to_thread(render, run, self.flow.run_dir(run), language)
        kwargs: dict[str, Any] = {"content": content, "embed": embed, "view": run_view(run, language)}
        if key != self._attached.get(run_id):  # unchanged pictures are not uploaded again
            kwargs["attachments"] = files
        channel = self.bot.get_partial_messageable(run.status_channel_id, guild_id=run.guild_id)
        try:
            await channel.get_partial_message(run.status_message_id).edit(**kwargs)
        except discord.NotFound:
            log.info("training run %s: its status message was deleted; no longer followed", run_id)
            await self.flow.store.set_status_final(run_id)
            return
        self._attached[run_id] = key
        if not run.active and run.status_final_at is None:
            await self.flow.store.set_status_final(run_id)
