r"""The local engine as a child process: ``EngineSupervisor``, what the child inherits, how its output is read.

``EngineSupervisor`` runs ``python -m engine serve`` as a child with a fresh random secret in
its environment (never on its command line), waits for its ready line, forwards its stderr to the
log, restarts it with backoff when it dies (the backoff resets after a healthy run), and stops it
with SIGTERM (then SIGKILL). Torch-free. The child gets an allow-list of the bot's environment (what
Python, torch, CUDA and the hub need), never the Discord token or the Redis password. Its output
is read in chunks and split on ``\n`` and ``\r``: ``StreamReader.readline`` raises on a line over
64 KiB, and progress bars write ``\r`` without newlines.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import secrets as secrets_module
import signal
import sys
import time
from pathlib import Path
from collections.abc import Awaitable
from typing import Any

from engine.contract.config import ArcaeConfig, Secrets
from engine.contract.transport import EngineUnavailable

log = logging.getLogger(__name__)
engine_log = logging.getLogger("arcae.engine")

READY_PREFIX = "ARCAE_ENGINE_READY"
STABLE_RUN_S = 60.0  # a child that ran this long restarts from the shortest backoff again

MAX_LOG_LINE_BYTES = 8192  # a longer run of child output without a line break is logged in pieces
# What the engine child may inherit from the bot: what Python, torch, CUDA and the hub need.
CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "TERM",
    "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "ARCAE_CONFIG",
})
CHILD_ENV_PREFIXES = (
    "LC_", "XDG_", "PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_",
    "CUDA", "CUBLAS_", "CUDNN_", "NCCL_", "NVIDIA_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "ORT_",
)


def child_env(config: ArcaeConfig) -> dict[str, str]:
    """The bot's environment, reduced to what the engine needs (an allow-list, not a deny-list).

    The Discord token and the Redis password are removed even if a prefix would admit them; the
    hub token (``[model] hub_token_env``) stays: the engine downloads the model.
    """
    keep = {config.model.hub_token_env}
    drop = {config.discord.token_env, config.engine.redis_password_env}
    return {
        name: value for name, value in os.environ.items()
        if name not in drop and (name in CHILD_ENV_NAMES or name in keep or name.startswith(CHILD_ENV_PREFIXES))
    }


class LineReader:
    r"""Lines of a child's output, read in chunks and split on ``\n`` and ``\r``.

    ``StreamReader.readline`` raises on a line over 64 KiB, and progress bars write ``\r``
    without newlines: a reader that died there would leave the child blocked on a full pipe.
    A run of output without any break is returned in pieces of ``MAX_LOG_LINE_BYTES``.
    """

    _BREAK = re.compile(rb"[\r\n]")

    def __init__(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        self._stream = stream
        self._buffer = b""
        self._lines: collections.deque[bytes] = collections.deque()
        self._eof = False

    async def next_line(self) -> str | None:
        """The next line (without its break), or None at end of output."""
        while not self._lines:
            if self._eof:
                return None
            chunk = await self._stream.read(65536)
            if not chunk:
                self._eof = True
                if self._buffer:
                    self._lines.append(self._buffer)
                    self._buffer = b""
                continue
            *lines, self._buffer = self._BREAK.split(self._buffer + chunk)
            for line in lines:
                self._lines.extend(line[i : i + MAX_LOG_LINE_BYTES] for i in range(0, len(line), MAX_LOG_LINE_BYTES))
            while len(self._buffer) > MAX_LOG_LINE_BYTES:
                self._lines.append(self._buffer[:MAX_LOG_LINE_BYTES])
                self._buffer = self._buffer[MAX_LOG_LINE_BYTES:]
        return self._lines.popleft().decode("utf-8", "replace")


class EngineSupervisor:
    """Runs the local engine as a child process and keeps it running (see the module docstring)."""

    def __init__(
        self,
        config_path: str | os.PathLike[str] | None,
        config: ArcaeConfig,
        secrets: Secrets | None = None,
        *,
        python: str = sys.executable,
        grace_s: float = 15.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        # None: no file was found, so the child finds none either and runs on the same defaults.
        self.config_path = Path(config_path).resolve() if config_path is not None else None
        self.config = config
        # A fresh secret per supervisor: only this bot and its child know it.
        self.secret = secrets_module.token_urlsafe(32)
        self._python = python
        self._grace_s = grace_s
        self._extra_env = dict(extra_env or {})
        self._proc: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task | None = None
        self._io_tasks: set[asyncio.Task] = set()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._closing = False
        self._stdout: LineReader | None = None
        self._port = 0
        self.url = ""
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> str:
        """Start the engine and wait for its ready line; return its URL (``EngineUnavailable`` if it fails)."""
        self.url = await self._spawn(self._port)
        self._monitor = asyncio.create_task(self._watch())
        return self.url

    async def close(self) -> int | None:
        """Stop the engine: SIGTERM, then SIGKILL after the grace period; return its exit status."""
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except (asyncio.CancelledError, Exception):
                pass
        status = await self._stop_child()
        for task in list(self._io_tasks):
            try:
                await asyncio.wait_for(task, 2)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()
        return status

    async def _stop_child(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._grace_s)
            except asyncio.TimeoutError:
                log.warning("the engine did not stop within %.0f s of SIGTERM; killing it", self._grace_s)
                proc.kill()
                await proc.wait()
        return proc.returncode

    async def _spawn(self, port: int) -> str:
        env = {**child_env(self.config), **self._extra_env, "PYTHONUNBUFFERED": "1"}
        env[self.config.engine.secret_env] = self.secret
        cmd = [self._python, "-m", "engine", "serve"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        cmd += ["--host", self.config.engine.host, "--port", str(port)]
        self._stderr_tail.clear()
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self._proc = proc
        self._stdout = LineReader(proc.stdout)
        self._start_io(self._forward_stderr(proc))
        timeout = self.config.engine.startup_timeout_s
        try:
            url = await asyncio.wait_for(self._read_ready_line(proc), timeout)
        except asyncio.TimeoutError:
            await self._stop_child()
            raise EngineUnavailable(f"the engine was not ready within {timeout:.0f} s ([engine] startup_timeout_s)") from None
        if url is None:
            status = await proc.wait()
            await asyncio.sleep(0.1)  # let the stderr forwarder catch the last lines
            tail = " | ".join(self._stderr_tail) or "no output"
            raise EngineUnavailable(f"the engine exited during start-up (status {status}): {tail[-600:]}")
        self._start_io(self._drain_stdout(self._stdout))
        self._port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        log.info("engine started (pid %d) at %s", proc.pid, url)
        return url

    async def _watch(self) -> None:
        """Restart the child with backoff whenever it exits without being asked to."""
        backoff = self.config.engine.restart_backoff_s or [1.0]
        failures = 0
        while not self._closing:
            assert self._proc is not None
            started = time.monotonic()
            status = await self._proc.wait()
            if self._closing:
                return
            if time.monotonic() - started >= STABLE_RUN_S:
                failures = 0
            while not self._closing:
                delay = backoff[min(failures, len(backoff) - 1)]
                log.warning("the engine exited unexpectedly (status %s); restarting in %.1f s", status, delay)
                await asyncio.sleep(delay)
                failures += 1
                try:
                    self.url = await self._spawn(self._port)
                    self.restarts += 1
                    break
                except (EngineUnavailable, OSError) as exc:
                    log.error("engine restart failed: %s", exc)
                    self._port = 0  # the old port may be taken: let the next start pick a free one

    async def _read_ready_line(self, proc: asyncio.subprocess.Process) -> str | None:
        assert self._stdout is not None
        while True:
            text = await self._stdout.next_line()
            if text is None:
                return None
            text = text.strip()
            if text.startswith(READY_PREFIX + " "):
                return text[len(READY_PREFIX) + 1 :].strip()
            if text:
                engine_log.info("%s", text)

    async def _forward_stderr(self, proc: asyncio.subprocess.Process) -> None:
        reader = LineReader(proc.stderr)
        while (text := await reader.next_line()) is not None:
            text = text.rstrip()
            if text:
                self._stderr_tail.append(text)
                engine_log.info("%s", text)

    async def _drain_stdout(self, reader: "LineReader") -> None:
        while (text := await reader.next_line()) is not None:
            if text.strip():
                engine_log.info("%s", text.rstrip())

    def _start_io(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._io_tasks.add(task)
        task.add_done_callback(self._io_tasks.discard)


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when the bot dies, so no orphan engine holds the GPU."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the engine then outlives a killed bot
        pass
