"""``/adapter drift`` without Discord: parse the admin's options, run the measurement on the engine, read the result.

The measurement (``training.learning.drift`` on the engine's GPU worker, between users' jobs; the
maths in ``training.data.drift_report``) compares each installed few-step mode with the standard
mode for one adapter mix. The bot sends one ``DriftRequest`` and waits for its terminal event; the
``Completed`` result carries the table, the recommendation and the chart, which the bot checks
(a PNG, bounded size) before attaching it. Nothing is stored in SQLite: a measurement the bot
stops waiting for (a restart) still finishes on the engine, its report in ``runs_dir/drift/<job id>``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from bot.errors import InvalidOption
from bot.i18n import _
from engine.contract import protocol

MAX_CHART_BYTES = 4 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ADAPTER = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]{0,63})(?::(?P<weight>-?[0-9]*\.?[0-9]+))?$")


def parse_mix(text: str | None) -> list[protocol.AdapterWeight]:
    """``"mystyle:0.8, hero-a"`` -> the adapter mix; a bad entry says what is allowed."""
    mix = []
    for part in re.split(r"[,\s]+", (text or "").strip()):
        if not part:
            continue
        m = _ADAPTER.fullmatch(part)
        weight = float(m["weight"]) if m and m["weight"] else None
        if not m or (weight is not None and not -4.0 <= weight <= 4.0):
            raise InvalidOption(_("adapters: `%(part)s` is not NAME or NAME:WEIGHT (weight -4 to 4), e.g. "
                                  "`mystyle:0.8, hero-a`.", part=part[:80]))
        mix.append(protocol.AdapterWeight(name=m["name"], weight=weight))
    return mix


def build_request(job_id: str, owner: str, *, adapters: str | None = None, prompt: str | None = None,
                  seeds: str | None = None, modes: str | None = None, lcm_weights: str | None = None,
                  steps: str | None = None) -> protocol.DriftRequest:
    """The ``DriftRequest`` for the command's options (unset ones: the engine's defaults)."""
    from pydantic import ValidationError

    from training.data import drift_report as dr

    try:
        options: dict[str, Any] = {"adapters": parse_mix(adapters)}
        if prompt:
            options["prompts"] = [prompt]
        if seeds:
            options["seeds"] = [int(s) for s in re.split(r"[,\s]+", seeds.strip()) if s]
        if modes:
            options["modes"] = [m for m in re.split(r"[,\s]+", modes.strip()) if m]
        if lcm_weights:
            options["lcm_weights"] = dr.parse_floats(lcm_weights, "lcm_weights", 0.1, 1.5)
        if steps:
            options["steps"] = dr.parse_steps(steps)
        return protocol.DriftRequest(job_id=job_id, owner=owner, options=protocol.DriftOptions(**options))
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise InvalidOption(_("%(where)s: %(error)s (allowed: a prompt up to 2000 characters, at most 4 seeds "
                                  "0-%(max_seed)s, 8 modes, 8 weights, 8 step counts).", where=where,
                                  error=err.get("msg"), max_seed=2**32 - 1)) from None
        if "invalid literal" in str(exc):
            raise InvalidOption(_("seeds: `%(seeds)s` must be whole numbers, e.g. `1,2`.", seeds=seeds)) from None
        raise InvalidOption(str(exc) + ".") from None


@dataclass
class DriftOutcome:
    """What the engine answered: ``ok`` with the result, or the reason it did not finish."""

    ok: bool
    message: object  # a str from the engine, or a bot.i18n.Text
    result: dict[str, Any]


async def run_on_engine(bot: Any, request: protocol.DriftRequest, timeout: float) -> DriftOutcome:
    """Submit ``request`` and wait for its terminal event (``EngineUnavailable``/``EngineRejected`` propagate)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    async def listener(event: Any) -> None:
        if isinstance(event, protocol.TERMINAL_EVENT_TYPES) and event.job_id == request.job_id and not done.done():
            done.set_result(event)

    bot.jobs.add_listener(listener)
    try:
        await bot.jobs.engine.submit(request)
        try:
            event = await asyncio.wait_for(asyncio.shield(done), timeout)
        except asyncio.TimeoutError:
            return DriftOutcome(False, _("still measuring; the report will be in the engine's runs folder under "
                                         "drift/%(job_id)s", job_id=request.job_id), {})
    finally:
        bot.jobs.remove_listener(listener)
    if isinstance(event, protocol.Completed):
        return DriftOutcome(True, str(event.result.get("summary", "")), dict(event.result))
    if isinstance(event, protocol.Canceled):
        return DriftOutcome(False, _("the measurement was canceled"), {})
    return DriftOutcome(False, event.message, {})


def chart_bytes(result: dict[str, Any]) -> bytes | None:
    """The chart PNG from a result, or None unless it is a PNG of bounded size (the engine is checked too)."""
    text = result.get("chart_png_b64")
    if not isinstance(text, str) or len(text) > 4 * MAX_CHART_BYTES // 3 + 4:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(PNG_SIGNATURE) else None
