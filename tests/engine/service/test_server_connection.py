"""The websocket server's per-connection sender: a client that stops reading is dropped once."""

from __future__ import annotations

import asyncio
import logging

from engine.service import server


class _StalledSocket:
    """A websocket whose peer never reads: every send waits forever."""

    def __init__(self) -> None:
        self.closed = False
        self.closes = 0

    async def send_str(self, text: str) -> None:
        await asyncio.Event().wait()

    async def close(self, **kwargs) -> None:
        self.closes += 1
        self.closed = True


async def test_a_client_that_stopped_reading_is_dropped_once(monkeypatch, caplog):
    monkeypatch.setattr(server, "MAX_PENDING_SENDS", 3)
    ws = _StalledSocket()
    conn = server._Connection(ws)
    with caplog.at_level(logging.WARNING, logger="engine.service.server"):
        for i in range(50):  # a burst of events after the client fell behind
            conn.send_text(f"event {i}")
        await asyncio.sleep(0)
    assert ws.closes == 1
    assert [r.getMessage() for r in caplog.records].count("dropping a client that stopped reading") == 1
    assert conn.outbox.qsize() <= 4  # nothing more is buffered for a dropped client
    conn.sender.cancel()
