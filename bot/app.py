"""The bot: one ``Bot`` subclass that builds the services and loads the cogs, one command tree.

Services are built once in ``setup_hook`` and handed to the cogs through the bot:
``db`` (SQLite), ``jobs`` (JobManager), ``catalog`` (adapters), and the engine connection
(a local child engine, a remote engine, or the Redis dispatcher, by ``[engine] mode``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.actions import handle_button
from bot.catalog import AdapterCatalog
from bot.db import Database
from bot.errors import NotAllowed, StartupError
from bot.i18n import ArcaeTranslator, _
from bot.job_manager import JobManager
from bot.replies import report_error
from bot.views import JobButton
from engine.contract.config import ArcaeConfig, Secrets

log = logging.getLogger(__name__)

COGS = (
    "bot.cogs.imagine",
    "bot.cogs.describe",
    "bot.cogs.history",
    "bot.cogs.jobs",
    "bot.cogs.settings",
    "bot.cogs.adapters",
    "bot.cogs.gallery",
    "bot.cogs.admin",
    "bot.cogs.training",
    "bot.cogs.adapter_admin",
)
READY_LOG_LINE = "Arcae bot ready"


class ArcaeTree(app_commands.CommandTree):
    """The one place command errors are handled: user-facing ones become ephemeral replies."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        if isinstance(error, app_commands.CommandNotFound):
            # E.g. an admin command Discord still shows from an older global sync: not registered here.
            error = NotAllowed(_("/%(command)s is not available in this server.", command=error.name))
        await report_error(interaction, error)


class ArcaeBot(commands.Bot):
    """Arcae's Discord client. No privileged intents: slash commands, buttons and reactions only."""

    def __init__(self, config: ArcaeConfig, secrets: Secrets, config_path: Path | None) -> None:
        intents = discord.Intents.default()
        intents.message_content = False
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, tree_cls=ArcaeTree,
                         help_command=None)
        self.config = config
        self.secrets = secrets
        self.config_path = config_path
        self.db: Database = None  # type: ignore[assignment]  # opened in setup_hook
        self.jobs: JobManager = None  # type: ignore[assignment]
        self.catalog: AdapterCatalog = None  # type: ignore[assignment]
        self.supervisor: Any = None
        self._engine_task: asyncio.Task[None] | None = None
        self._resumed = False
        self._rating_warned = False
        self._background: set[asyncio.Task[None]] = set()

    async def setup_hook(self) -> None:
        self.db = await Database.open(self.config.path(self.config.storage.database))
        self.jobs = JobManager(self)
        self.catalog = AdapterCatalog(self)
        await self.catalog.load()
        # Persistent buttons: any "arcae:<action>:<job>" custom id, on messages of any age.
        self.add_dynamic_items(JobButton)
        for cog in COGS:
            await self.load_extension(cog)
        # Command descriptions in zh-CN and ja (bot.i18n); names stay ASCII.
        await self.tree.set_translator(ArcaeTranslator())
        await self._sync_commands()
        if not self.config.engine.rate_outputs:
            self._warn_unrated(False)
        await self._connect_engine()

    def _home_only_commands(self) -> None:
        """Register the admin cogs' commands to the home servers only (none when there are none)."""
        homes = [discord.Object(id=g) for g in sorted(self.config.discord.home_guilds)]
        for cog in self.cogs.values():
            if not getattr(cog, "admin_only", False):
                continue
            for command in cog.get_app_commands():
                self.tree.remove_command(command.name)
                if homes:
                    self.tree.add_command(command, guilds=homes)
        if not homes:
            log.warning("no home servers configured ([discord] home_guild_ids or guild_ids): admin commands "
                        "(/status, /audit, /train, /adapter) are off")

    async def _sync_commands(self) -> None:
        """User commands globally or to ``guild_ids``; admin commands only to the home servers."""
        self._home_only_commands()
        guild_ids = self.config.discord.guild_ids
        if not guild_ids:
            synced = await self.tree.sync()
            log.info("synced %d commands globally (Discord may take up to an hour to show them)", len(synced))
        for guild_id in sorted(set(guild_ids) | self.config.discord.home_guilds):
            guild = discord.Object(id=guild_id)
            if guild_ids:
                self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands to guild %s", len(synced), guild_id)

    async def _connect_engine(self) -> None:
        from bot.engine_link import EngineLink, engine_url
        from bot.engine_child import EngineSupervisor
        from engine.contract.transport import EngineRejected

        mode = self.config.engine.mode
        if mode == "redis":
            from engine.scaleout.dispatcher import Dispatcher

            link: Any = Dispatcher(self.config, self.secrets, on_event=self.jobs.on_event,
                                   on_connect=self._on_engine_connect)
            self.jobs.engine = link
            self._engine_task = asyncio.create_task(self._start_quietly(link.start()))
        elif mode == "remote":
            link = EngineLink(engine_url(self.config), self.secrets.engine_secret, self.jobs.on_event,
                              self._on_engine_connect, **self._link_options())
            self.jobs.engine = link
            try:
                await link.start()
            except EngineRejected as exc:
                # The message says what to fix: the secret on both sides, or the protocol version.
                raise StartupError(f"the engine at {engine_url(self.config)} refused the bot: {exc.message}") from None
        else:
            self.supervisor = EngineSupervisor(self.config_path, self.config, self.secrets)
            link = EngineLink(lambda: self.supervisor.url, self.supervisor.secret, self.jobs.on_event,
                              self._on_engine_connect, **self._link_options())
            self.jobs.engine = link
            # Loading the model takes minutes on a cold disk; Discord must not wait for it.
            self._engine_task = asyncio.create_task(self._start_quietly(self._start_local(link)))

    def _link_options(self) -> dict[str, Any]:
        """What both engine-link modes share: TLS verification, restart notices, the secret's name."""
        from bot.engine_link import client_ssl_context
        from engine.contract.transport import TransportError

        try:
            ssl_context = client_ssl_context(self.config)
        except TransportError as exc:
            raise StartupError(str(exc)) from None
        return {"ssl_context": ssl_context, "on_disconnect": self.jobs.notify_disconnect,
                "secret_name": self.config.engine.secret_env}

    async def _start_local(self, link: Any) -> None:
        """Start the child engine, retrying with the configured backoff until it comes up."""
        backoff = self.config.engine.restart_backoff_s or [5.0]
        attempt = 0
        while True:
            try:
                await self.supervisor.start()
                break
            except Exception as exc:  # e.g. the model is missing: say why, keep jobs queued, retry
                delay = backoff[min(attempt, len(backoff) - 1)]
                log.error("the engine did not start (%s); retrying in %g s", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
        await link.start()

    async def _start_quietly(self, coro: Any) -> None:
        try:
            await coro
        except Exception:
            log.exception("the engine did not start; jobs stay queued until it does")

    def _warn_unrated(self, rates_outputs: bool | None) -> None:
        from bot.policy import rating_status

        if not self._rating_warned:
            self._rating_warned = True
            log.warning("output rating is %s", rating_status(rates_outputs, self.config))

    async def _check_rating(self) -> None:
        """Warn the operator once when the engine reports that it does not rate outputs (e.g. the tagger failed)."""
        try:
            status = await self.jobs.engine.status()
        except Exception as exc:  # the warning is advisory; /status asks again
            log.info("could not ask the engine whether it rates outputs: %s", exc)
            return
        if status.rates_outputs is False:
            self._warn_unrated(False)

    async def _on_engine_connect(self) -> None:
        log.info("engine connected; resubmitting unfinished jobs")
        await self._check_rating()
        await self.catalog.refresh()
        await self.jobs.resubmit_unfinished()
        await self.jobs.notify_connect()

    async def run_job_button(self, interaction: discord.Interaction, action: str, job_id: str,
                             image: int = 1) -> None:
        """A persistent job button was pressed (``bot.views.JobButton``): run its action (on image ``image``)."""
        await handle_button(interaction, action, job_id, image)

    async def on_ready(self) -> None:
        log.info("%s as %s in %d guild(s)", READY_LOG_LINE, self.user, len(self.guilds))
        if not self._resumed:
            self._resumed = True
            # Results recorded before a crash or restart but never shown.
            self._background.add(asyncio.create_task(self.jobs.deliver_pending_results()))
            self._background.add(asyncio.create_task(self.jobs.redeliver_loop()))

    async def close(self) -> None:
        if self.jobs is not None and self.jobs.engine is not None:
            try:
                await self.jobs.engine.close()
            except Exception:
                log.exception("closing the engine connection failed")
        for task in (self._engine_task, *self._background):
            if task is not None:
                task.cancel()
        if self.supervisor is not None:
            await self.supervisor.close()
        await super().close()
        if self.db is not None:
            await self.db.close()
