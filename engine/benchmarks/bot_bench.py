"""The ``ack`` case of the CPU benchmark: how fast the bot acknowledges a burst of /imagine.

Discord drops an interaction the bot has not answered within 3 seconds, so the number that
matters for a busy server is the time from INTERACTION_CREATE to the interaction callback
(the defer), for many users at once. This starts the local Discord double
(``engine.benchmarks.discord_double``), the real bot
process (``python -m bot``) and, through the bot, the real engine child on the tiny model;
then, in each trial, one /imagine alone and N simultaneous /imagine from N different users.
Every trial starts on an idle bot: it waits until all jobs of the previous one are delivered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.benchmarks.ratios import Ratio, write_bench_config

ACK_WINDOW_S = 3.0  # Discord's limit for the first response to an interaction
BOT_READY = "Arcae bot ready"
ENGINE_CONNECTED = "engine connected"
STEPS = 2  # small, so the engine's work between trials stays short


def bench_ack(trials: int, n: int = 50) -> list[Ratio]:
    """Ack latency of ``n`` simultaneous /imagine vs one alone (median and p95), one run."""
    from engine.benchmarks.discord_double import DiscordDouble

    # The double's access log would print one line per REST call (thousands) and slow it down.
    access_log = logging.getLogger("aiohttp.access")
    level = access_log.level
    access_log.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="arcae-bench-ack-") as tmp:
            times = asyncio.run(_measure(Path(tmp), DiscordDouble, trials, n))
    finally:
        access_log.setLevel(level)
    return times.ratios(n)


@dataclass
class AckTimes:
    """Seconds from dispatch to callback; ``math.inf`` where no callback came."""

    single: list[float] = field(default_factory=list)  # one per trial
    bursts: list[list[float]] = field(default_factory=list)  # n per trial
    deferred_in_window: int = 0  # measured interactions answered with a defer within 3 s
    dispatched: int = 0  # measured interactions (the warm-up is not counted)

    def ratios(self, n: int) -> list[Ratio]:
        ok, total = self.deferred_in_window, self.dispatched
        worst = max(self.single + [t for b in self.bursts for t in b])
        share = (f"acked within 3 s: {100.0 * ok / total:.1f}% ({ok}/{total}); "
                 f"slowest {'none' if math.isinf(worst) else f'{worst * 1000:.0f} ms'}")
        med_burst = statistics.median(statistics.median(b) for b in self.bursts)
        med_single = statistics.median(self.single)
        p95_burst = statistics.median(p95(b) for b in self.bursts)
        p95_single = p95(self.single)
        return [
            Ratio("ack", f"ack latency median, {n} simultaneous / 1 alone", med_burst, med_single,
                  med_burst / med_single, share, id="ack_median_50_vs_1"),
            Ratio("ack", f"ack latency p95, {n} simultaneous / 1 alone", p95_burst, p95_single,
                  p95_burst / p95_single, f"1 alone: p95 over {len(self.single)} trial(s)", id="ack_p95_50_vs_1"),
        ]


def p95(values: list[float]) -> float:
    """The 95th percentile by nearest rank (the maximum for fewer than 20 values)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def write_ack_config(root: Path, double: Any) -> Path:
    """The bench config plus the bot's sections: the double as Discord, limits loose enough for a burst."""
    from engine.generation.tiny import make_tiny_model

    model_dir = make_tiny_model(root / "tiny-sdxl", seed=0)
    path = write_bench_config(root, model_dir)
    # [engine] mode stays the default, "local": the bot starts and stops its own engine child.
    path.write_text(path.read_text(encoding="utf-8") + f"""
[discord]
guild_ids = [{double.guild_id}]
api_base = "{double.api_base}"
gateway_url = "{double.gateway_url}"

[gallery]
post = "off"

[limits]
max_queued_per_user = 3
cooldown_s = 0.0
global_max_queued = 1000
""", encoding="utf-8")
    return path


class BotProcess:
    """``python -m bot`` with its log in a file; started, waited for, and stopped with SIGTERM."""

    def __init__(self, config: Path, token: str, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        # One torch thread per process, as in the tests: bot, engine and bench share the cores.
        self.env = {**os.environ, "ARCAE_DISCORD_TOKEN": token, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                    "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}
        self.proc: asyncio.subprocess.Process | None = None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    async def start(self, timeout: float = 300.0) -> None:
        """Start the bot and wait until it is on the gateway and its engine is connected."""
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "--config", str(self.config), env=self.env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not (BOT_READY in (text := self.log()) and ENGINE_CONNECTED in text):
            if self.proc.returncode is not None:
                raise RuntimeError(f"the bot exited with status {self.proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bot and its engine were not ready within {timeout:.0f} s:\n{text[-3000:]}")
            await asyncio.sleep(0.1)

    async def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (the bot then stops its engine child); SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), grace_s)
        except asyncio.TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


class AckRun:
    """Fires /imagine bursts at the bot through the double and times each acknowledgement."""

    def __init__(self, double: Any, bot: BotProcess, times: AckTimes) -> None:
        self.double = double
        self.bot = bot
        self.times = times
        self.users = 0

    def _new_user(self) -> dict[str, Any]:
        # A fresh user per interaction: per-user queue limits never refuse a burst.
        self.users += 1
        return self.double._user(f"bench-user-{self.users}")

    async def fire(self, k: int, *, count: bool = True) -> list[float]:
        """Dispatch ``k`` /imagine at once; return each one's ack latency; wait until all are delivered."""
        d = self.double
        users = [self._new_user() for _ in range(k)]
        records = await asyncio.gather(*(
            d.invoke_slash(u, d.channel, "imagine", {"prompt": "1girl, solo", "steps": STEPS, "seed": i})
            for i, u in enumerate(users)))
        try:
            await d.wait_for(lambda: all(r.callbacks for r in records), timeout=10 * ACK_WINDOW_S)
        except AssertionError:
            pass  # counted below as not acknowledged
        arrived = {c.path: c.at for c in d.calls if c.method == "POST" and c.path.startswith("/interactions/")}
        latencies = []
        for r in records:
            at = arrived.get(f"/interactions/{r.id}/{r.token}/callback")
            latencies.append(math.inf if at is None else at - r.created)
            deferred = bool(r.callbacks) and r.callbacks[0].get("type") == 5  # not a refusal
            if count:
                self.times.dispatched += 1
                self.times.deferred_in_window += deferred and latencies[-1] <= ACK_WINDOW_S
        await self._wait_delivered(records, timeout=60.0 + 2.0 * k)
        return latencies

    def _settled(self, record: Any) -> bool:
        """Delivered (the result's buttons are on the message), refused (message deleted) or never deferred."""
        if not record.callbacks or record.callbacks[0].get("type") != 5:
            return True
        if record.original_id in self.double.deleted:
            return True
        msg = self.double.original(record) or {}
        ids = [c.get("custom_id", "") for row in msg.get("components", []) for c in row.get("components", [])]
        return any(i.startswith("arcae:reroll:") for i in ids)

    async def _wait_delivered(self, records: list[Any], timeout: float) -> None:
        try:
            await self.double.wait_for(lambda: all(self._settled(r) for r in records), timeout=timeout)
        except AssertionError:
            left = sum(not self._settled(r) for r in records)
            raise RuntimeError(f"{left} of {len(records)} /imagine jobs were not delivered within {timeout:.0f} s; "
                               f"bot log:\n{self.bot.log()[-3000:]}") from None


async def _measure(root: Path, double_cls: type, trials: int, n: int) -> AckTimes:
    """Start the double and the bot (with its engine), run the trials, stop everything."""
    double = double_cls()
    await double.start()
    bot = BotProcess(write_ack_config(root, double), double.token, root / "bot.log")
    times = AckTimes()
    try:
        await bot.start()
        run = AckRun(double, bot, times)
        await run.fire(1, count=False)  # warm-up: first command, first job, first upload
        for _ in range(trials):
            times.single.extend(await run.fire(1))
            times.bursts.append(await run.fire(n))
    finally:
        status = await bot.stop()
        await double.close()
    if status != 0:
        print(f"ack: warning: the bot exited with status {status} on SIGTERM; log tail:\n{bot.log()[-2000:]}",
              flush=True)
    return times
