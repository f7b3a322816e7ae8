"""Hostile results: a forged or broken ``Completed`` never puts a file into a Discord channel.

The engine here is the real engine server (``engine.service.server.EngineServer``) in front of a
scripted worker that answers each job with whatever events a test hands it, as a process that
took the engine's port, or a compromised engine, would. The bot is the real process over the
local Discord double; every assertion is on what the double received. Each case sends its
event twice where it can: naming a file by path (what the bot used to read) and carrying the
same bytes in the event (what the bot now accepts, after checking them).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import secrets
import struct
import zlib
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import pytest_asyncio
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.contract import protocol
from engine.service.server import EngineServer
from tests.bot.conftest import READY_LINE, Process, free_port, write_stack_config
from engine.benchmarks.discord_double import DiscordDouble

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "hostile-test-engine-secret"
# In the bot's environment and in every hostile file: it must never reach Discord.
CANARY = "canary-" + secrets.token_hex(8)


class Raw:
    """An event sent exactly as written (``protocol.encode`` calls ``model_dump_json``)."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.text = json.dumps(payload)

    def model_dump_json(self) -> str:
        return self.text


Plan = Callable[[Any], list[Raw]]


class ScriptedWorker:
    """The worker surface ``EngineServer`` uses; a job whose prompt has a plan gets its events."""

    def __init__(self) -> None:
        self.alive = False
        self.emit: Callable[[Any], None] | None = None
        self.plans: dict[str, Plan] = {}

    def start(self, emit: Callable[[Any], None]) -> None:
        self.alive, self.emit = True, emit

    def stop(self) -> None:
        self.alive = False

    def submit(self, request: Any) -> protocol.Queued:
        plan = self.plans.get(request.params.prompt)
        if plan is not None:
            asyncio.get_running_loop().call_later(0.2, self._run, request, plan)
        return protocol.Queued(job_id=request.job_id, attempt=request.attempt, position=0)

    def _run(self, request: Any, plan: Plan) -> None:
        assert self.emit is not None
        self.emit(Raw({"type": "started", "job_id": request.job_id, "attempt": request.attempt, "seq": 1}))
        for event in plan(request):
            self.emit(event)

    def cancel(self, job_id: str) -> bool:
        return False

    def list_adapters(self) -> list[protocol.AdapterInfo]:
        return []

    def status(self) -> protocol.EngineStatus:
        return protocol.EngineStatus(model="scripted", device="cpu")

    def reload_adapters_later(self) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result({"added": [], "removed": [], "changed": []})
        return done


def completed(path: str, data: bytes | None = None) -> Plan:
    """A plan answering with one Completed image named ``path``, with ``data`` as its bytes if given."""

    def plan(request: Any) -> list[Raw]:
        image: dict[str, Any] = {"path": path, "seed": 1, "width": 64, "height": 64, "sha256": ""}
        if data is not None:
            image["data_b64"] = base64.b64encode(data).decode("ascii")
        return [Raw({"type": "completed", "job_id": request.job_id, "attempt": request.attempt, "seq": 2,
                     "images": [image]})]

    return plan


def png(size: tuple[int, int] = (64, 64), *, noise: bool = False) -> bytes:
    """A PNG carrying the canary in a text chunk (written before the pixel data)."""
    pixels = os.urandom(size[0] * size[1] * 3) if noise else bytes(size[0] * size[1] * 3)
    info = PngInfo()
    info.add_text("comment", CANARY)
    out = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def truncated(data: bytes) -> bytes:
    """The first two thirds of a file: the pixel data ends early."""
    return data[: len(data) * 2 // 3]


def bomb_header() -> bytes:
    """A tiny PNG whose header claims 60000x60000 pixels (a decompression bomb's shape)."""
    data = bytearray(png((1, 1)))
    data[16:24] = struct.pack(">II", 60000, 60000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR crc, so only the size is wrong
    return bytes(data)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    double = DiscordDouble()
    await double.start()
    worker = ScriptedWorker()
    server = EngineServer(worker, secret=SECRET)
    port = free_port()
    await server.start("127.0.0.1", port)
    config = write_stack_config(tmp, tmp / "no-model", double, port)
    config.write_text(config.read_text(encoding="utf-8").replace("max_queued_per_user = 3",
                                                                  "max_queued_per_user = 100"), encoding="utf-8")
    outputs = config.parent / "data" / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ARCAE_DISCORD_TOKEN": double.token, "ARCAE_ENGINE_SECRET": SECRET,
           "ARCAE_TEST_CANARY": CANARY, "PYTHONUNBUFFERED": "1"}
    bot = Process(["-m", "bot", "--config", str(config)], env, tmp / "bot.log")
    try:
        await bot.start(READY_LINE)
        yield SimpleNamespace(double=double, worker=worker, bot=bot, tmp=tmp, outputs=outputs)
    finally:
        await bot.stop()
        await server.stop()
        await double.close()


def leaks(double: DiscordDouble) -> list[str]:
    """REST calls whose files or JSON carry the canary."""
    needle = CANARY.encode()
    return [f"{c.method} {c.path}" for c in double.calls
            if any(needle in data for _name, data in c.files) or needle in json.dumps(c.json or {}).encode()]


def job_files(double: DiscordDouble, inter: Any) -> list[dict]:
    """Attachments on the job's message and its follow-ups."""
    messages = [m for m in (double.original(inter), *double.followups(inter)) if m]
    return [a for m in messages for a in m.get("attachments", [])]


async def run_job(h: Any, plan: Plan) -> tuple[Any, dict]:
    """/imagine answered by ``plan``; returns the interaction and its message once the job ended."""
    prompt = "hostile " + secrets.token_hex(4)
    h.worker.plans[prompt] = plan
    d = h.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": prompt})

    def ended() -> dict | None:
        msg = d.original(inter)
        if msg and (msg.get("attachments") or "failed" in (msg.get("content") or "")):
            return msg
        return None

    return inter, await d.wait_for(ended, timeout=30)


def hostile_path(h: Any, case: str) -> str:
    """A file the bot must never read, set up for ``case``."""
    outside = h.tmp / "outside.txt"
    outside.write_text(f"SECRET={CANARY}\n", encoding="utf-8")
    if case == "environ":
        return "/proc/self/environ"
    if case == "outside":
        return str(outside)
    link = h.outputs / "link.png"
    if not link.is_symlink():
        link.symlink_to(outside)
    return str(link)


@pytest.mark.parametrize("case", ["environ", "outside", "symlink"])
async def test_a_result_naming_a_file_is_never_read(hostile, case):
    inter, msg = await run_job(hostile, completed(hostile_path(hostile, case)))
    assert not leaks(hostile.double), "a file named by the engine reached Discord"
    assert not job_files(hostile.double, inter), msg
    assert "not a valid image" in msg["content"], msg["content"]
    assert hostile.bot.proc.returncode is None


BAD_IMAGES = {
    "not an image": lambda: f"SECRET={CANARY}\n".encode(),
    "truncated png": lambda: truncated(png(noise=True)),
    "bomb header": bomb_header,
    "too many pixels": lambda: png((2048, 2048)),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
async def test_a_bad_image_never_reaches_a_channel(hostile, kind):
    data = BAD_IMAGES[kind]()
    assert CANARY.encode() in data
    # As a file in the outputs folder (what the bot used to read), then as bytes in the event.
    stored = hostile.outputs / f"bad-{kind.replace(' ', '-')}.png"
    stored.write_bytes(data)
    for plan in (completed(str(stored)), completed("/nowhere/x.png", data)):
        inter, msg = await run_job(hostile, plan)
        assert not leaks(hostile.double), f"a {kind} reached Discord"
        assert not job_files(hostile.double, inter), msg
        assert "not a valid image" in msg["content"], msg["content"]
    assert hostile.bot.proc.returncode is None


async def test_a_genuine_result_still_arrives(hostile):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(good, format="PNG")
    # Its path names the environment: the path is ignored, the checked bytes are what is shown.
    inter, msg = await run_job(hostile, completed("/proc/self/environ", good.getvalue()))
    files = job_files(hostile.double, inter)
    assert len(files) == 1 and files[0]["filename"].endswith(".png"), msg
    assert hostile.double.attachments[int(files[0]["id"])] == good.getvalue()
    assert not leaks(hostile.double)
    stored = sorted(p.name for p in hostile.outputs.iterdir() if not p.is_symlink())
    assert any(name.endswith("-0.png") for name in stored), stored


async def test_delivery_reads_only_regular_files_inside_the_outputs_folder(tmp_path):
    # What the bot stored is read back by plain name from its outputs folder: a symlink or a
    # FIFO planted there under a result's name, or a stored path pointing elsewhere, is refused.
    from bot.results import ResultLimits, ResultRejected, read_result

    limits = ResultLimits(max_bytes=1 << 20, max_pixels=65536)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    good = png((8, 8))
    (outputs / "j-0.png").write_bytes(good)
    assert read_result(outputs, str(tmp_path / "elsewhere" / "j-0.png"), limits) == good
    secret = tmp_path / "secret.png"
    secret.write_bytes(good)
    (outputs / "j-1.png").symlink_to(secret)
    with pytest.raises(OSError):
        read_result(outputs, "j-1.png", limits)
    os.mkfifo(outputs / "j-2.png")
    with pytest.raises(ResultRejected, match="not a regular file"):
        read_result(outputs, "j-2.png", limits)
    (outputs / "j-3.png").write_bytes(f"SECRET={CANARY}".encode())
    with pytest.raises(ResultRejected, match="only PNG or JPEG|not a complete"):
        read_result(outputs, "j-3.png", limits)


def jpeg_with_canary(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(out, format="JPEG", comment=CANARY.encode())
    return out.getvalue()


BAD_PREVIEWS = {
    "a png": lambda: png(),
    "not an image": lambda: f"SECRET={CANARY}\n".encode(),
    "truncated jpeg": lambda: truncated(jpeg_with_canary((96, 96))),
    "too many pixels": lambda: jpeg_with_canary((1024, 1024)),
}


async def test_a_bad_preview_is_never_shown_and_the_job_still_arrives(hostile):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 40, 200)).save(good, format="PNG")

    def plan(request: Any) -> list[Raw]:
        events = []
        for seq, make in enumerate(BAD_PREVIEWS.values(), start=2):
            data = make()
            assert CANARY.encode() in data
            events.append(Raw({"type": "progress", "job_id": request.job_id, "attempt": request.attempt, "seq": seq,
                               "step": seq, "total": 10, "preview_jpeg_b64": base64.b64encode(data).decode()}))
        events.append(Raw({"type": "progress", "job_id": request.job_id, "attempt": request.attempt, "seq": 8,
                           "step": 8, "total": 10, "preview_jpeg_b64": "%%% not base64 " + CANARY}))
        final = json.loads(completed("/x.png", good.getvalue())(request)[0].text)
        return [*events, Raw({**final, "seq": 9})]  # after the progress events

    inter, msg = await run_job(hostile, plan)
    assert not leaks(hostile.double), "a bad preview reached Discord"
    previews = [name for c in hostile.double.calls for name, _ in c.files if name.startswith("preview_")]
    assert not previews, previews
    files = job_files(hostile.double, inter)
    assert len(files) == 1 and files[0]["filename"].endswith(".png"), msg
    assert "preview not shown" in hostile.bot.log()
