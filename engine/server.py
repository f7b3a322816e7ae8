"""The engine's websocket server: one transport in front of the ``GpuWorker``.

``ws://HOST:PORT/ws`` (aiohttp). Each connection starts with ``Hello`` (protocol version and
shared secret, compared in constant time); then JSON requests from ``engine.protocol``.
Replies echo the request's ``rid`` so a client can await them while job events (broadcast to
every authenticated connection, without ``rid``) stream on the same socket. A request that
fails validation gets ``ErrorResponse`` and the connection stays usable.

``serve()`` is what ``python -m engine serve`` runs: load the model once, start the worker
and the server, print ``ARCAE_ENGINE_READY <url>``, then run until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
from typing import Any, TextIO

from aiohttp import WSMsgType, web

from engine import protocol
from engine.config import ArcaeConfig, Secrets
from engine.errors import EngineError
from engine.worker import GpuWorker

log = logging.getLogger(__name__)

READY_PREFIX = "ARCAE_ENGINE_READY"
HANDSHAKE_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 1 << 20  # requests are small; a 1 MiB frame is already hostile
MAX_PENDING_SENDS = 10_000  # a client this far behind is dropped rather than buffered forever
_ERROR_CODES = set(protocol.ErrorCode.__args__)  # type: ignore[attr-defined]
_HANDSHAKE_HELP = 'the first message must be {"type": "hello", "version": %d, "secret": "..."}'


class _Connection:
    """One authenticated websocket: messages leave in order through one sender task."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.sender = asyncio.create_task(self._send_loop())
        self.dropped = False  # too far behind: closed, and nothing more is queued for it

    def send(self, message: Any) -> None:
        self.send_text(protocol.encode(message))

    def send_text(self, text: str) -> None:
        if self.dropped:
            return
        if self.outbox.qsize() >= MAX_PENDING_SENDS:
            # Once: later events would otherwise each log again and schedule another close.
            self.dropped = True
            log.warning("dropping a client that stopped reading")
            self.outbox.put_nowait(None)
            asyncio.ensure_future(self.ws.close(code=1008, message=b"too slow"))
            return
        self.outbox.put_nowait(text)

    async def _send_loop(self) -> None:
        while True:
            text = await self.outbox.get()
            if text is None or self.ws.closed:
                return
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        try:
            await asyncio.wait_for(self.sender, timeout=5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.sender.cancel()


class EngineServer:
    """Serves ``worker`` over websockets; ``secret`` None means no authentication (dev only)."""

    def __init__(self, worker: GpuWorker, *, secret: str | None, engine_name: str = "arcae-engine") -> None:
        self.worker = worker
        self._secret = secret.encode("utf-8") if secret is not None else None
        self.engine_name = engine_name
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: set[asyncio.Task] = set()
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int) -> str:
        """Start the worker thread and listen; return the websocket URL."""
        self._loop = asyncio.get_running_loop()
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port)
        await self._site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"ws://{shown_host}:{bound_port}/ws"
        if not self.worker.alive:
            self.worker.start(self.emit_threadsafe)
        return self.url

    async def stop(self) -> None:
        """Stop accepting, interrupt the running job, deliver its last event, close clients."""
        if self._site is not None:
            await self._site.stop()
        await asyncio.to_thread(self.worker.stop)
        await asyncio.sleep(0.05)  # let the worker's final events reach the outboxes
        for conn in list(self._connections):
            await conn.close()
            await conn.ws.close(code=1001, message=b"engine shutting down")
        if self._runner is not None:
            await self._runner.cleanup()

    def emit_threadsafe(self, event: Any) -> None:
        """The worker's event callback: hand the event to the event loop (never blocks)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, event)
        except RuntimeError:  # loop closed while shutting down
            pass

    def _broadcast(self, event: Any) -> None:
        text = protocol.encode(event)
        for conn in list(self._connections):
            conn.send_text(text)

    # ------------------------------------------------------------------ connections

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=30.0)
        await ws.prepare(request)
        conn = _Connection(ws)
        try:
            if not await self._handshake(conn):
                await conn.close()
                await ws.close()
                return ws
            self._connections.add(conn)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._handle_text(conn, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    conn.send(protocol.ErrorResponse(code="bad_request", message="send JSON text frames, not binary"))
                else:
                    break
        finally:
            self._connections.discard(conn)
            await conn.close()
        return ws

    async def _handshake(self, conn: _Connection) -> bool:
        """Read and check ``Hello``; answer ``HelloOk`` or a typed error. Never echoes the secret."""
        help_text = _HANDSHAKE_HELP % protocol.PROTOCOL_VERSION
        try:
            msg = await conn.ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            conn.send(protocol.ErrorResponse(code="bad_request", message="no hello within 10 s; " + help_text))
            return False
        if msg.type != WSMsgType.TEXT:
            return False
        try:
            hello = protocol.decode_request(msg.data)
        except protocol.ProtocolError as exc:
            version = _peek_version(msg.data)
            if version is not None and version != protocol.PROTOCOL_VERSION:
                conn.send(_version_error(version))
            else:
                conn.send(protocol.ErrorResponse(code="bad_request", message=f"{exc.message}; {help_text}"))
            return False
        if not isinstance(hello, protocol.Hello):
            conn.send(protocol.ErrorResponse(code="bad_request", message=help_text))
            return False
        if hello.version != protocol.PROTOCOL_VERSION:
            conn.send(_version_error(hello.version, rid=hello.rid))
            return False
        if self._secret is not None and not hmac.compare_digest(hello.secret.encode("utf-8"), self._secret):
            log.warning("refused a connection with a wrong secret (client %r)", hello.client[:64])
            conn.send(protocol.ErrorResponse(code="unauthorized", message="wrong or missing engine secret", rid=hello.rid))
            return False
        conn.send(protocol.HelloOk(engine=self.engine_name, rid=hello.rid))
        return True

    async def _handle_text(self, conn: _Connection, text: str) -> None:
        try:
            request = protocol.decode_request(text)
        except protocol.ProtocolError as exc:
            conn.send(protocol.ErrorResponse(code="bad_request", message=exc.message, rid=_peek_rid(text)))
            return
        if isinstance(request, protocol.ReloadAdaptersRequest):
            # Waits for the running job to end: answer from a task so this socket stays usable.
            task = asyncio.create_task(self._reply_async(conn, request, self._reload(request)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        conn.send(self._answer(request))

    def _answer(self, request: Any) -> Any:
        """The reply to one decoded request (any ``EngineError`` becomes an ``ErrorResponse``)."""
        rid = request.rid
        try:
            if isinstance(request, protocol.Hello):
                return protocol.ErrorResponse(code="bad_request", message="already authenticated", rid=rid)
            if isinstance(request, (protocol.GenerateRequest, protocol.Img2ImgRequest, protocol.TrainRequest)):
                return self.worker.submit(request).model_copy(update={"rid": rid})
            if isinstance(request, protocol.CancelRequest):
                if self.worker.cancel(request.job_id):
                    return protocol.Ack(request="cancel", detail=request.job_id, rid=rid)
                return protocol.ErrorResponse(
                    code="not_found", message=f"no queued or running job {request.job_id}", job_id=request.job_id, rid=rid
                )
            if isinstance(request, protocol.ListAdaptersRequest):
                return protocol.AdapterList(adapters=self.worker.list_adapters(), rid=rid)
            if isinstance(request, protocol.StatusRequest):
                return self.worker.status().model_copy(update={"rid": rid})
            return protocol.ErrorResponse(code="bad_request", message=f"unsupported request {request.type}", rid=rid)
        except EngineError as exc:
            return _error_response(exc, request)
        except Exception:
            log.exception("request %s failed", request.type)
            return protocol.ErrorResponse(
                code="engine_error", message=f"internal error handling {request.type}; see the engine log", rid=rid
            )

    async def _reload(self, request: protocol.ReloadAdaptersRequest) -> Any:
        try:
            result = await asyncio.wrap_future(self.worker.reload_adapters_later())
            return protocol.Ack(request="reload_adapters", detail=json.dumps(result, default=str), rid=request.rid)
        except EngineError as exc:
            return _error_response(exc, request)
        except Exception:
            log.exception("adapter reload failed")
            return protocol.ErrorResponse(
                code="engine_error", message="adapter reload failed; see the engine log", rid=request.rid
            )

    @staticmethod
    async def _reply_async(conn: _Connection, request: Any, answer: Any) -> None:
        conn.send(await answer)


def _error_response(exc: EngineError, request: Any) -> protocol.ErrorResponse:
    code = exc.code if exc.code in _ERROR_CODES else "engine_error"
    return protocol.ErrorResponse(
        code=code, message=exc.message, job_id=getattr(request, "job_id", None), rid=request.rid
    )


def _version_error(version: Any, rid: str | None = None) -> protocol.ErrorResponse:
    return protocol.ErrorResponse(
        code="version_mismatch",
        message=f"this engine speaks protocol version {protocol.PROTOCOL_VERSION}, the client {version!r}; "
        "update the bot and the engine together",
        rid=rid,
    )


def _peek_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}


def _peek_rid(text: str) -> str | None:
    """The ``rid`` of an invalid request, so the client's waiting call still gets its answer."""
    rid = _peek_json(text).get("rid")
    return rid if isinstance(rid, str) and len(rid) <= 64 else None


def _peek_version(text: str) -> Any:
    data = _peek_json(text)
    return data.get("version") if data.get("type") == "hello" else None


# ---------------------------------------------------------------------- the serve command


def load_rater(config: ArcaeConfig) -> Any:
    """The WD tagger's ``rate`` when output rating is on and the tagger loads, else None."""
    if not config.engine.rate_outputs:
        log.warning("output rating is off ([engine] rate_outputs = false): outputs are unrated, and the bot "
                    "applies [content] unrated_action to them in channels that are not age-restricted")
        return None
    try:
        from training.tagger import WDTagger
    except ImportError as exc:
        log.warning("output rating is off: the tagger module is not available (%s)", exc)
        return None
    source = str(config.tagger.model)
    local = config.path(source)
    if local.exists():
        source = str(local)
    try:
        tagger = WDTagger.load(
            source,
            revision=config.tagger.revision,
            batch_size=1,
            general_threshold=config.tagger.general_threshold,
            character_threshold=config.tagger.character_threshold,
            mcut=config.tagger.mcut,
        )
    except Exception as exc:  # rating is optional; the bot applies its rules to unrated images
        log.warning("output rating is off: the WD tagger %s could not be loaded (%s)", source, str(exc)[:300])
        return None
    return tagger.rate


def build_worker(config: ArcaeConfig, secrets: Secrets) -> GpuWorker:
    """Load the model, adapters and rater once and wrap them in a GpuWorker (not started)."""
    from engine.generator import Generator

    generator = Generator.from_config(config, secrets, rater=load_rater(config))
    train_factory = None
    if config.engine.accepts_training:  # TrainRequests run on this worker, on the pipeline it holds
        from engine.training_hook import training_factory

        train_factory = training_factory(config, generator)
    return GpuWorker(generator, config, train_factory=train_factory)


async def serve(
    config: ArcaeConfig,
    secrets: Secrets,
    *,
    host: str,
    port: int,
    secret: str | None,
    ready_stream: TextIO,
) -> int:
    """Run the engine until SIGTERM/SIGINT; print the ready line on ``ready_stream``; return 0."""
    worker = await asyncio.to_thread(build_worker, config, secrets)
    info = worker.describe()
    server = EngineServer(worker, secret=secret, engine_name=f"arcae-engine {info.get('model', '')}".strip())
    url = await server.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("engine ready at %s (model %s on %s)", url, info.get("model"), info.get("device"))
    ready_stream.write(f"{READY_PREFIX} {url}\n")
    ready_stream.flush()
    await stop.wait()
    log.info("stopping: no new connections; interrupting the running job at its next step")
    await server.stop()
    log.info("engine stopped")
    return 0
