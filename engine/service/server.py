"""The engine's websocket server: one transport in front of the ``GpuWorker``.

``ws://HOST:PORT/ws`` (aiohttp; ``wss://`` with ``[engine] tls``). Each connection starts with a
challenge-response handshake over the shared secret, which never crosses the wire: the client
sends ``Hello`` (version, nonce), the engine answers ``Challenge`` (its nonce and its HMAC proof),
the client answers ``HelloProof`` (its HMAC proof, compared in constant time), the engine
``HelloOk``. Then JSON requests from ``engine.contract.protocol``.
Replies echo the request's ``rid`` so a client can await them while job events (broadcast to
every authenticated connection, without ``rid``) stream on the same socket. A request that
fails validation gets ``ErrorResponse`` and the connection stays usable.

``serve()`` is what ``python -m engine serve`` runs: load the model once, start the worker
and the server, print ``ARCAE_ENGINE_READY <url>``, then run until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
from typing import Any, TextIO

from aiohttp import WSMsgType, web

from engine.contract import protocol
from engine.contract.config import ArcaeConfig, Secrets
from engine.contract.errors import EngineError
from engine.service.gpu_worker import GpuWorker

log = logging.getLogger(__name__)

READY_PREFIX = "ARCAE_ENGINE_READY"
HANDSHAKE_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 1 << 20  # requests are small; a 1 MiB frame is already hostile
MAX_PENDING_SENDS = 10_000  # a client this far behind is dropped rather than buffered forever
_ERROR_CODES = set(protocol.ErrorCode.__args__)  # type: ignore[attr-defined]
MAX_HANDSHAKE_BYTES = 4096  # a hello is ~200 bytes; anything bigger is refused before parsing
_HANDSHAKE_HELP = 'the first message must be {"type": "hello", "version": %d, "nonce": "<64 hex digits>"}'
AUTH_FAILED = "engine authentication failed: check %s on both sides"


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

    def __init__(
        self,
        worker: GpuWorker,
        *,
        secret: str | None,
        engine_name: str = "arcae-engine",
        secret_name: str = "ARCAE_ENGINE_SECRET",
    ) -> None:
        self.worker = worker
        self._secret = secret
        self._secret_name = secret_name
        self.engine_name = engine_name
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: set[asyncio.Task] = set()
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> str:
        """Start the worker thread and listen (TLS with ``ssl_context``); return the websocket URL."""
        self._loop = asyncio.get_running_loop()
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await self._site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "wss" if ssl_context is not None else "ws"
        self.url = f"{scheme}://{shown_host}:{bound_port}/ws"
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
        except (RecursionError, ValueError) as exc:  # hostile input must not cost a traceback per connection
            log.warning("closed a connection after an undecodable message (%s)", type(exc).__name__)
        finally:
            self._connections.discard(conn)
            await conn.close()
        return ws

    async def _handshake(self, conn: _Connection) -> bool:
        """Challenge-response over the shared secret; answer ``HelloOk`` or a typed error.

        The engine proves itself first (a client learns nothing it could replay), then checks
        the client's proof in constant time. Neither the secret nor a proof is ever echoed.
        """
        hello = await self._receive_handshake(conn, protocol.Hello)
        if hello is None:
            return False
        if hello.version != protocol.PROTOCOL_VERSION:
            conn.send(_version_error(hello.version, rid=hello.rid))
            return False
        key = self._secret or ""  # no secret (dev only): proofs over the empty key, not checked
        engine_nonce = protocol.new_nonce()
        proof = protocol.handshake_proof(key, "engine", hello.nonce, engine_nonce)
        conn.send(protocol.Challenge(nonce=engine_nonce, proof=proof, rid=hello.rid))
        answer = await self._receive_handshake(conn, protocol.HelloProof)
        if answer is None:
            return False
        expected = protocol.handshake_proof(key, "client", hello.nonce, engine_nonce)
        if self._secret is not None and not protocol.proof_matches(expected, answer.proof):
            log.warning("refused a connection: wrong proof of the engine secret (client %r)", hello.client[:64])
            message = AUTH_FAILED % self._secret_name
            conn.send(protocol.ErrorResponse(code="unauthorized", message=message, rid=answer.rid))
            return False
        conn.send(protocol.HelloOk(engine=self.engine_name, rid=answer.rid))
        return True

    async def _receive_handshake(self, conn: _Connection, kind: type) -> Any:
        """One handshake message of type ``kind``, or None after answering why it was refused."""
        help_text = _HANDSHAKE_HELP % protocol.PROTOCOL_VERSION
        try:
            msg = await conn.ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            message = "no handshake message within 10 s; " + help_text
            conn.send(protocol.ErrorResponse(code="bad_request", message=message))
            return None
        if msg.type != WSMsgType.TEXT:
            closed = msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
            if kind is protocol.HelloProof and closed:
                log.warning("a client left during the handshake (it did not accept this engine's proof: "
                            "do the engine secrets differ?)")
            return None
        if len(msg.data) > MAX_HANDSHAKE_BYTES:
            log.warning("refused a connection: handshake message of %d bytes (at most %d)",
                        len(msg.data), MAX_HANDSHAKE_BYTES)
            conn.send(protocol.ErrorResponse(
                code="bad_request", message=f"handshake message too large (at most {MAX_HANDSHAKE_BYTES} bytes)"))
            return None
        try:
            message = protocol.decode_request(msg.data)
        except protocol.ProtocolError as exc:
            version = _peek_version(msg.data)
            if version is not None and version != protocol.PROTOCOL_VERSION:
                conn.send(_version_error(version))
            else:
                conn.send(protocol.ErrorResponse(code="bad_request", message=f"{exc.message}; {help_text}"))
            return None
        if not isinstance(message, kind):
            expected = "hello" if kind is protocol.Hello else "hello_proof"
            conn.send(protocol.ErrorResponse(
                code="bad_request", message=f"expected {expected}, got {message.type}; {help_text}", rid=message.rid))
            return None
        return message

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
            if isinstance(request, (protocol.Hello, protocol.HelloProof)):
                return protocol.ErrorResponse(code="bad_request", message="already authenticated", rid=rid)
            if isinstance(request, (protocol.GenerateRequest, protocol.Img2ImgRequest, protocol.TrainRequest,
                                    protocol.DriftRequest, protocol.DistillRequest)):
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
    except (ValueError, TypeError, RecursionError):  # deeply nested input is hostile, not a bug
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
        from training.data.tagger import WDTagger
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
            batch_size=8,  # the images of one pipeline call are rated together (Generator.finish)
            general_threshold=config.tagger.general_threshold,
            character_threshold=config.tagger.character_threshold,
            mcut=config.tagger.mcut,
        )
    except Exception as exc:  # rating is optional; the bot applies its rules to unrated images
        log.warning("output rating is off: the WD tagger %s could not be loaded (%s)", source, str(exc)[:300])
        return None
    return tagger.rate


def server_ssl_context(config: ArcaeConfig) -> ssl.SSLContext | None:
    """The engine's TLS context when ``[engine] tls`` is on (``EngineError`` naming a bad file)."""
    engine = config.engine
    if not engine.tls:
        return None
    if not engine.tls_cert_file or not engine.tls_key_file:
        raise EngineError("[engine] tls = true: set tls_cert_file and tls_key_file on the engine's host")
    cert, key = config.path(engine.tls_cert_file), config.path(engine.tls_key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise EngineError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    if engine.tls_client_ca_file:  # mutual TLS: only clients with a certificate from this CA
        client_ca = config.path(engine.tls_client_ca_file)
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise EngineError(f"cannot load [engine] tls_client_ca_file {client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def build_worker(config: ArcaeConfig, secrets: Secrets) -> GpuWorker:
    """Load the model, adapters and rater once and wrap them in a GpuWorker (not started)."""
    from engine.generation.generator import Generator

    generator = Generator.from_config(config, secrets, rater=load_rater(config))
    train_factory = None
    if config.engine.accepts_training:  # TrainRequests run on this worker, on the pipeline it holds
        from engine.service.training_hook import training_factory

        train_factory = training_factory(config, generator)
    from engine.service.drift_hook import drift_factory

    worker = GpuWorker(generator, config, train_factory=train_factory)
    worker.drift_factory = drift_factory(config, generator)  # DriftRequests: fast modes measured
    if config.engine.accepts_training:  # DistillRequests: few-step adapters distilled for a mix
        from engine.service.distill_hook import distill_factory

        worker.distill_factory = distill_factory(config, generator)
    return worker


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
    tls = server_ssl_context(config)  # before the model loads: a bad certificate fails in seconds
    worker = await asyncio.to_thread(build_worker, config, secrets)
    info = worker.describe()
    server = EngineServer(worker, secret=secret, engine_name=f"arcae-engine {info.get('model', '')}".strip(),
                          secret_name=config.engine.secret_env)
    if tls is None and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("the engine link on %s is not encrypted: set [engine] tls = true with a certificate, "
                    "or reach it through an SSH/WireGuard tunnel (README, Security model)", host)
    url = await server.start(host, port, ssl_context=tls)
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
