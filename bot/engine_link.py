"""The bot's side of the engine link: ``EngineLink``, the websocket client (the child process is ``bot.engine_child``).

Torch-free: imports only the standard library, aiohttp, pydantic, ``engine.contract.protocol``,
and ``engine.contract.config``.

- ``EngineLink`` keeps one websocket to the engine, reconnects in the background with backoff,
  and calls ``on_connect`` after every successful handshake (the bot resubmits its unfinished
  jobs there) and ``on_disconnect`` when an established connection is lost. The handshake is a
  challenge-response over the shared secret (see ``engine.service.server``): the secret never crosses
  the wire, and a peer that cannot prove it knows the secret is refused before any request is
  sent. Requests carry a ``rid`` that the engine echoes, so calls await their reply while job
  events stream to ``on_event`` on the same socket. Every way of not reaching the engine
  surfaces as one ``EngineUnavailable``; a typed refusal as ``EngineRejected(code, message)``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from pydantic import SecretStr

from engine.contract import protocol
from engine.contract.transport import (
    ConnectCallback,
    EngineRejected,
    EngineUnavailable,
    EventCallback,
    TransportError,
)
from engine.contract.config import ArcaeConfig

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
# A Completed carries its images (base64): the protocol bounds it.
MAX_EVENT_BYTES = protocol.MAX_COMPLETED_CHARS
MAX_HANDSHAKE_REPLY_BYTES = 4096  # a challenge is ~300 bytes
AUTH_FAILED = "engine authentication failed: check {name} on both sides"


def engine_url(config: ArcaeConfig) -> str:
    """The websocket URL of a remote engine (``[engine] mode = "remote"``; ``wss`` with ``tls``)."""
    host = config.engine.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    scheme = "wss" if config.engine.tls else "ws"
    return f"{scheme}://{host}:{config.engine.port}/ws"


def client_ssl_context(config: ArcaeConfig) -> ssl.SSLContext | None:
    """How the bot verifies the engine's certificate (``[engine] tls``); None without TLS."""
    if not config.engine.tls:
        return None
    ca_file = config.path(config.engine.tls_ca_file) if config.engine.tls_ca_file else None
    if ca_file is not None and not ca_file.is_file():
        raise TransportError(f"[engine] tls_ca_file {ca_file} does not exist")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load [engine] tls_ca_file {ca_file}: {exc}") from None
    if config.engine.tls_client_cert_file:  # mutual TLS: the engine asks for this certificate
        cert, key = config.path(config.engine.tls_client_cert_file), config.path(config.engine.tls_client_key_file)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot load the client certificate {cert} / key {key}: {exc}") from None
    return context


DisconnectCallback = Callable[[], Awaitable[None]]


class EngineLink:
    """A reconnecting websocket client of the engine (see the module docstring).

    ``url`` may be a callable returning the current URL (e.g. ``lambda: supervisor.url``), so
    that a restarted engine on another port is found.
    """

    def __init__(
        self,
        url: str | Callable[[], str],
        secret: str | SecretStr | None,
        on_event: EventCallback | None = None,
        on_connect: ConnectCallback | None = None,
        *,
        client_name: str = "arcae-bot",
        request_timeout_s: float = 30.0,
        reload_timeout_s: float = 600.0,
        backoff_s: Sequence[float] = RECONNECT_BACKOFF_S,
        ssl_context: ssl.SSLContext | None = None,
        on_disconnect: DisconnectCallback | None = None,
        secret_name: str = "ARCAE_ENGINE_SECRET",
    ) -> None:
        self._url = url if callable(url) else (lambda: url)
        self._ssl = ssl_context
        self._on_disconnect = on_disconnect
        self._auth_failed = AUTH_FAILED.format(name=secret_name)
        self._secret = secret.get_secret_value() if isinstance(secret, SecretStr) else (secret or "")
        self._on_event = on_event
        self._on_connect = on_connect
        self._client_name = client_name
        self._request_timeout_s = request_timeout_s
        self._reload_timeout_s = reload_timeout_s
        self._backoff_s = tuple(backoff_s) or (1.0,)
        self._rids = itertools.count(1)
        self._pending: dict[str, asyncio.Future] = {}
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None
        self._dispatcher: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._closing = False
        self.rejected: EngineRejected | None = None  # set when the engine refused the handshake
        self._handshakes = 0  # successful handshakes so far: a refusal at first contact is final

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Start connecting; wait (up to ``timeout``) for the first attempt's outcome.

        Raises ``EngineRejected`` if the engine refused the handshake (wrong secret or protocol
        version: retrying would not help). Otherwise the link keeps reconnecting in the
        background; check ``connected``.
        """
        if self._runner is None:
            self._session = aiohttp.ClientSession()
            self._dispatcher = asyncio.create_task(self._dispatch_events())
            self._runner = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self._first_attempt.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        if self.rejected is not None:
            raise self.rejected

    async def close(self) -> None:
        """Close the connection and stop reconnecting; pending calls get ``EngineUnavailable``."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        for task in (self._runner, self._dispatcher, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._runner, self._dispatcher, *self._tasks):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._fail_pending("the engine link was closed")
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ requests

    async def submit(self, request: Any) -> protocol.Queued:
        """Queue a generate/img2img/train request; resubmitting a job id the engine holds is idempotent."""
        reply = await self._request(request)
        if not isinstance(reply, protocol.Queued):
            raise EngineUnavailable(f"unexpected reply {reply.type!r} to {request.type}")
        return reply

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if the engine does not hold it."""
        try:
            await self._request(protocol.CancelRequest(job_id=job_id))
        except EngineRejected as exc:
            if exc.code == "not_found":
                return False
            raise
        return True

    async def list_adapters(self) -> list[protocol.AdapterInfo]:
        reply = await self._request(protocol.ListAdaptersRequest())
        return list(reply.adapters)

    async def status(self) -> protocol.EngineStatus:
        return await self._request(protocol.StatusRequest())

    async def reload_adapters(self) -> dict[str, Any]:
        """Rescan the engine's adapters (between jobs); return {"added", "removed", "changed"}."""
        reply = await self._request(protocol.ReloadAdaptersRequest(), timeout=self._reload_timeout_s)
        try:
            return json.loads(reply.detail) if reply.detail else {}
        except ValueError:
            return {"detail": reply.detail}

    async def _request(self, message: Any, timeout: float | None = None) -> Any:
        ws = self._ws
        if ws is None or ws.closed or not self.connected:
            raise EngineUnavailable("the engine is not connected (starting or restarting); try again shortly")
        rid = f"r{next(self._rids)}"
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            try:
                await ws.send_str(protocol.encode(message.model_copy(update={"rid": rid})))
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                raise EngineUnavailable(f"lost the connection to the engine ({type(exc).__name__})") from None
            limit = self._request_timeout_s if timeout is None else timeout
            try:
                reply = await asyncio.wait_for(future, limit)
            except asyncio.TimeoutError:
                raise EngineUnavailable(f"the engine did not answer {message.type} within {limit:.0f} s") from None
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, protocol.ErrorResponse):
            if reply.code == "engine_unavailable":  # e.g. shutting down: the caller retries later
                raise EngineUnavailable(reply.message)
            raise EngineRejected(reply.code, reply.message)
        return reply

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))

    # ------------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            try:
                await self._connect_and_read()
                failures = 0
            except EngineRejected as exc:
                if self._handshakes == 0:  # first contact: wrong secret or version, retrying would not help
                    log.error("the engine refused this bot: %s", exc.message)
                    self.rejected = exc
                    self._first_attempt.set()
                    return
                # Was connected before: the engine may be restarting, or a stranger holds its port.
                if failures == 0:
                    log.error("%s; retrying in the background", exc.message)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, EngineUnavailable) as exc:
                if failures == 0:
                    log.warning("engine not reachable (%s); retrying in the background", _describe(exc))
            finally:
                self._ws = None
                was_connected = self._connected.is_set()
                self._connected.clear()
                self._fail_pending("lost the connection to the engine")
                if was_connected and not self._closing and self._on_disconnect is not None:
                    self._spawn(self._call_on_disconnect())
            self._first_attempt.set()
            if self._closing:
                return
            await asyncio.sleep(self._backoff_s[min(failures, len(self._backoff_s) - 1)])
            failures += 1

    async def _connect_and_read(self) -> None:
        assert self._session is not None
        ws = await self._session.ws_connect(
            self._url(), heartbeat=20.0, max_msg_size=MAX_EVENT_BYTES, ssl=self._ssl if self._ssl else True
        )
        try:
            reply = await self._handshake(ws)
            self._handshakes += 1
            self._ws = ws
            self._connected.set()
            self._first_attempt.set()
            log.info("connected to %s", reply.engine or "the engine")
            if self._on_connect is not None:
                self._spawn(self._call_on_connect())
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._route(msg.data)
                elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                    break
            if not self._closing:
                log.warning("lost the connection to the engine")
        finally:
            await ws.close()

    async def _handshake(self, ws: aiohttp.ClientWebSocketResponse) -> protocol.HelloOk:
        """Prove both ways that each side knows the secret, without sending it (see ``engine.service.server``).

        The engine proves itself first: a peer that cannot (a stranger on the engine's port) is
        refused before this side sends its own proof or any request.
        """
        client_nonce = protocol.new_nonce()
        await ws.send_str(protocol.encode(protocol.Hello(nonce=client_nonce, client=self._client_name, rid="hello")))
        challenge = await self._handshake_reply(ws)
        if not isinstance(challenge, protocol.Challenge):  # e.g. a bare "hello_ok": it proved nothing
            raise EngineRejected("unauthorized", self._auth_failed)
        expected = protocol.handshake_proof(self._secret, "engine", client_nonce, challenge.nonce)
        if not protocol.proof_matches(expected, challenge.proof):
            await ws.close(code=4401, message=b"engine authentication failed")
            raise EngineRejected("unauthorized", self._auth_failed)
        proof = protocol.handshake_proof(self._secret, "client", client_nonce, challenge.nonce)
        await ws.send_str(protocol.encode(protocol.HelloProof(proof=proof, rid="hello")))
        reply = await self._handshake_reply(ws)
        if not isinstance(reply, protocol.HelloOk):
            raise EngineUnavailable(f"unexpected handshake reply {reply.type!r}")
        return reply

    async def _handshake_reply(self, ws: aiohttp.ClientWebSocketResponse) -> Any:
        msg = await ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise EngineUnavailable("the engine closed the connection during the handshake")
        if len(msg.data) > MAX_HANDSHAKE_REPLY_BYTES:
            raise EngineRejected("unauthorized", self._auth_failed + " (oversized handshake reply)")
        try:
            reply = protocol.decode_event(msg.data)
        except protocol.ProtocolError as exc:
            detail = f"{self._auth_failed} (bad handshake reply: {exc.message[:200]})"
            raise EngineRejected("unauthorized", detail) from None
        if isinstance(reply, protocol.ErrorResponse):
            message = self._auth_failed if reply.code == "unauthorized" else reply.message
            raise EngineRejected(reply.code, message)
        return reply

    def _route(self, text: str) -> None:
        try:
            message = protocol.decode_event(text)
        except protocol.ProtocolError as exc:
            log.warning("ignored a message from the engine: %s", exc.message)
            return
        rid = getattr(message, "rid", None)
        if rid is not None:
            future = self._pending.get(rid)
            if future is not None and not future.done():
                future.set_result(message)
            return  # a reply nobody waits for any more (timed out)
        self._events.put_nowait(message)

    async def _dispatch_events(self) -> None:
        """Deliver events to ``on_event`` one at a time, in arrival order."""
        while True:
            event = await self._events.get()
            if self._on_event is None:
                continue
            try:
                await self._on_event(event)
            except Exception:
                log.exception("on_event failed for %s", type(event).__name__)

    async def _call_on_disconnect(self) -> None:
        try:
            await self._on_disconnect()  # type: ignore[misc]
        except Exception:
            log.exception("on_disconnect failed")

    async def _call_on_connect(self) -> None:
        try:
            await self._on_connect()  # type: ignore[misc]
        except TransportError as exc:
            log.warning("on_connect stopped: %s", exc)
        except Exception:
            log.exception("on_connect failed")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
