"""The bot's copy of the engine's adapter list: for autocomplete, triggers and /adapters.

Refreshed from the engine at most every ``TTL_S`` seconds and kept in SQLite, so
autocomplete answers instantly (Discord gives it 3 s) even while the engine restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from engine.contract import protocol

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)

TTL_S = 60.0


class AdapterCatalog:
    """Adapters by name; ``refresh()`` asks the engine, ``get``/``names`` never wait on it."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot
        self._by_name: dict[str, protocol.AdapterInfo] = {}
        self._fetched = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def load(self) -> None:
        """The last known list, from the database (at start, before the engine answers)."""
        self._by_name = {a.name: a for a in await self.bot.db.load_adapters()}

    async def refresh(self) -> None:
        engine = self.bot.jobs.engine
        if engine is None:
            return
        try:
            adapters = await engine.list_adapters()
        except Exception as exc:  # the engine restarting must not break autocomplete
            log.info("adapter list not refreshed: %s", exc)
            return
        self._by_name = {a.name: a for a in adapters}
        self._fetched = time.monotonic()
        await self.bot.db.save_adapters(adapters)

    def refresh_soon(self) -> None:
        """Refresh in the background when the copy is older than ``TTL_S``."""
        stale = time.monotonic() - self._fetched > TTL_S
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self.refresh())

    def get(self, name: str) -> protocol.AdapterInfo | None:
        return self._by_name.get(name)

    def all(self, kind: str | None = None) -> list[protocol.AdapterInfo]:
        items = sorted(self._by_name.values(), key=lambda a: (a.kind, a.name.lower()))
        return [a for a in items if kind is None or a.kind == kind]

    def names(self, kinds: tuple[str, ...]) -> list[str]:
        return [a.name for a in self.all() if a.kind in kinds]
