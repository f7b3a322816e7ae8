"""Bot test fixtures: the Discord double, the real engine on the tiny model, the bot as a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest_asyncio

from engine.benchmarks.discord_double import DiscordDouble
from tests.conftest import PYTHON, REPO, write_config

READY_LINE = "Arcae bot ready"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bot_config_text(double: DiscordDouble, engine_port: int, *, extra: str = "", gallery_post: str = "shared",
                    gallery: str = "") -> str:
    """The [discord]/[gallery]/[limits] sections pointing the bot at the double and the engine.

    ``gallery``: more lines for the [gallery] section (e.g. the starboard's ``promote_at``).
    """
    return f"""
[discord]
guild_ids = [{double.guild_id}]
admin_role_ids = [{double.admin_role}]
progress_edit_interval_s = 1.0
api_base = "{double.api_base}"
gateway_url = "{double.gateway_url}"

[gallery]
channel_id = {double.gallery_channel["id"]}
post = "{gallery_post}"
{gallery}

[limits]
max_queued_per_user = 3
cooldown_s = 0.0
global_max_queued = 20
{extra}"""


def with_unrated_action(extra: str, unrated_action: str | None) -> str:
    """``extra`` with ``[content] unrated_action`` set (None: left to the default, "withhold")."""
    if unrated_action is None:
        return extra
    line = f'unrated_action = "{unrated_action}"\n'
    if "[content]\n" in extra:
        return extra.replace("[content]\n", "[content]\n" + line, 1)
    return extra + "\n[content]\n" + line


def write_stack_config(tmp_path: Path, model_dir: Path, double: DiscordDouble, engine_port: int, *,
                       extra: str = "", rate_outputs: bool = False, unrated_action: str | None = "show",
                       gallery_post: str = "shared", gallery: str = "") -> Path:
    """One config file shared by the engine and the bot (remote mode on a fixed loopback port).

    The tiny model's outputs are unrated unless ``rate_outputs``; most tests want to see them in
    any channel, so ``unrated_action`` defaults to "show" here (the product's default is "withhold").
    """
    extra = with_unrated_action(extra, unrated_action)
    path = write_config(tmp_path, model_dir, bot_config_text(double, engine_port, extra=extra, gallery_post=gallery_post,
                                                                 gallery=gallery))
    text = path.read_text(encoding="utf-8").replace(
        "[engine]\ndevice = \"cpu\"\nport = 0\n",
        f"[engine]\ndevice = \"cpu\"\nmode = \"remote\"\nhost = \"127.0.0.1\"\nport = {engine_port}\n"
        f"rate_outputs = {'true' if rate_outputs else 'false'}\n")
    assert f"port = {engine_port}" in text, "tests/conftest.py's [engine] section changed"
    path.write_text(text, encoding="utf-8")
    return path


def make_adapters(adapters_dir: Path) -> None:
    """Random LoRAs for the tiny model: one style, two characters with trigger words."""
    from engine.benchmarks.lora_synth import make_lora
    from engine.generation.tiny import build_tiny_components

    unet = build_tiny_components(0)["unet"]
    adapters_dir.mkdir(parents=True, exist_ok=True)
    make_lora(unet, adapters_dir / "ink-style.safetensors", kind="style", triggers=["ink style"], seed=1)
    make_lora(unet, adapters_dir / "hero-a.safetensors", kind="character", triggers=["hero_a", "red scarf"], seed=2)
    make_lora(unet, adapters_dir / "hero-b.safetensors", kind="character", triggers=["hero_b"], seed=3)


class Process:
    """A child process (`python -m engine serve` or `python -m bot`) with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    async def start(self, ready: str, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                PYTHON, *self.args, cwd=REPO, env=self.env, stdout=log, stderr=asyncio.subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        start_len = len(self.log())
        while ready not in self.log()[start_len:]:
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.args} exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.args} not ready after {timeout} s:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.1)

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 15)
        except asyncio.TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


class Stack:
    """The double, the engine process and the bot process of one test module."""

    def __init__(self, double: DiscordDouble, config: Path, env: dict[str, str], tmp: Path) -> None:
        self.double = double
        self.config = config
        self.env = env
        self.tmp = tmp
        self.engine = Process(["-m", "engine", "serve", "--config", str(config)], env, tmp / "engine.log")
        self.bot = Process(["-m", "bot", "--config", str(config)], env, tmp / "bot.log")

    async def restart_bot(self) -> None:
        assert await self.bot.stop() == 0, self.bot.log()[-3000:]
        await self.bot.start(READY_LINE)


@contextlib.asynccontextmanager
async def running_stack(tmp: Path, model_dir: Path, *, extra: str = "", rate_outputs: bool = False,
                        unrated_action: str | None = "show", gallery_post: str = "shared",
                        limits: dict[str, float] | None = None, gallery: str = ""):
    """Start the double, the real engine (tiny model) and the real bot process; stop them after.

    ``extra`` is TOML for sections the base config lacks (e.g. [tagger], [training], [content]);
    ``unrated_action`` None leaves ``[content] unrated_action`` at the product default ("withhold");
    ``limits`` replaces values of the [limits] section; ``gallery`` adds lines to [gallery].
    """
    double = DiscordDouble()
    await double.start()
    port = free_port()
    config = write_stack_config(tmp, model_dir, double, port, extra=extra, rate_outputs=rate_outputs,
                                unrated_action=unrated_action, gallery_post=gallery_post, gallery=gallery)
    for key, value in (limits or {}).items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", config.read_text(encoding="utf-8"))
        assert n == 1, f"[limits] {key} not in the base config"
        config.write_text(text, encoding="utf-8")
    env = {**os.environ, "ARCAE_DISCORD_TOKEN": double.token, "ARCAE_ENGINE_SECRET": "test-engine-secret",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    s = Stack(double, config, env, tmp)
    try:
        await s.engine.start("ARCAE_ENGINE_READY", timeout=120)
        await s.bot.start(READY_LINE)
        yield s
    finally:
        await s.bot.stop()
        await s.engine.stop()
        await double.close()
        # Kept outside pytest's rotating tmp dirs so a failure can be read afterwards.
        # The xdist worker's name keeps two workers' "bot-stack0" apart.
        keep = Path(os.environ.get("ARCAE_TEST_LOGS", "/tmp/arcae-test-logs")) / os.environ.get(
            "PYTEST_XDIST_WORKER", "") / tmp.name
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("bot.log", "engine.log"):
            if (tmp / name).exists():
                (keep / name).write_bytes((tmp / name).read_bytes())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    """Double + real engine (tiny model) + real bot process, shared by a test module."""
    tmp = tmp_path_factory.mktemp("bot-stack")
    make_adapters(tmp / "adapters")
    async with running_stack(tmp, tiny_model_dir) as s:
        yield s
