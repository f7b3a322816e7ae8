"""Test helpers that speak the engine link's handshake by hand (raw websockets, no EngineLink)."""

from __future__ import annotations

import json
import ssl

import aiohttp
from aiohttp import web

from engine.contract import protocol as p


async def raw_connect(url: str, *, ssl_context: ssl.SSLContext | None = None):
    """An open websocket to the engine, before any handshake: (session, ws)."""
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(url, ssl=ssl_context if ssl_context else True)
    except BaseException:
        await session.close()
        raise
    return session, ws


async def handshake(ws, secret: str, *, proof: str | None = None) -> dict:
    """Hello → Challenge (checked) → HelloProof; return the engine's last reply as a dict.

    ``proof`` replaces the client's correct proof (to test refusals).
    """
    nonce = p.new_nonce()
    await ws.send_str(json.dumps({"type": "hello", "version": p.PROTOCOL_VERSION, "nonce": nonce, "client": "test"}))
    challenge = json.loads((await ws.receive(timeout=10)).data)
    assert challenge["type"] == "challenge", challenge
    expected = p.handshake_proof(secret, "engine", nonce, challenge["nonce"])
    assert p.proof_matches(expected, challenge["proof"]), "the engine did not prove it knows the secret"
    answer = proof or p.handshake_proof(secret, "client", nonce, challenge["nonce"])
    await ws.send_str(json.dumps({"type": "hello_proof", "proof": answer}))
    return json.loads((await ws.receive(timeout=10)).data)


async def authenticated(url: str, secret: str, *, ssl_context: ssl.SSLContext | None = None):
    """A websocket past the handshake: (session, ws)."""
    session, ws = await raw_connect(url, ssl_context=ssl_context)
    try:
        reply = await handshake(ws, secret)
        assert reply["type"] == "hello_ok", reply
    except BaseException:
        await ws.close()
        await session.close()
        raise
    return session, ws


class Squatter:
    """A websocket server on the engine's port that does not know the secret; records every frame."""

    def __init__(self, answer: str) -> None:
        self.answer = answer  # "hello_ok": trusts anyone; "challenge": a made-up proof
        self.frames: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"ws://127.0.0.1:{self.runner.addresses[0][1]}/ws"

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            self.frames.append(msg.data)
            data = json.loads(msg.data)
            if data.get("type") != "hello":
                continue
            if self.answer == "hello_ok":
                await ws.send_str(json.dumps({"type": "hello_ok", "rid": data.get("rid"), "engine": "squatter"}))
            else:
                reply = {"type": "challenge", "rid": data.get("rid"), "nonce": "00" * 32, "proof": "11" * 32}
                await ws.send_str(json.dumps(reply))
        return ws

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
