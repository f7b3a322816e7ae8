"""Issue 11, hostile bursts and crashes: limits hold under simultaneous requests, no acknowledged job is lost.

The real bot process and the real engine (tiny model) over the local Discord double, with
tight limits. Requests are fired together the way a script (or a double click) would; what is
asserted is what users see: how many got a job, how many a refusal, and that every
acknowledged "thinking…" ends in an image or a clear message.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
import pytest_asyncio

from bot.training_flow import MAX_ATTEMPTS
from tests.bot.conftest import READY_LINE, running_stack
from tests.bot.test_training_commands import answer, invoke, png, training_extra

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMITS = {"max_queued_per_user": 3, "cooldown_s": 3.0, "global_max_queued": 10}
REFUSALS = ("the limit is", "Cooldown:", "The queue is full")
LOADING = 128  # message flag: the deferred "thinking…" placeholder
SLOW = {"steps": 60, "count": 4}  # long enough that no job finishes while a burst is being counted


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    from tests.training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("hostile-limits")
    tagger_dir = make_tiny_tagger(tmp / "tagger")
    async with running_stack(tmp, tiny_model_dir, limits=LIMITS, extra=training_extra(tagger_dir)) as s:
        s.double.latency_s = 0.1  # Discord's usual round trip: concurrent requests overlap as they do there
        yield s


def refusal(d, inter) -> str | None:
    """The refusal the user was shown (an immediate ephemeral reply, or a follow-up after a defer)."""
    texts = [cb["data"].get("content") or "" for cb in inter.callbacks if cb["type"] == 4]
    texts += [m.get("content") or "" for m in d.followups(inter)]
    return next((t for t in texts if any(r in t for r in REFUSALS)), None)


def thinking(d, inter) -> bool:
    """The interaction's message is still the deferred "thinking…" placeholder."""
    msg = d.original(inter)
    return msg is not None and int(msg["id"]) not in d.deleted and bool(msg["flags"] & LOADING)


def job_shown(d, inter) -> bool:
    """The interaction's own message shows a job (its status line or its result)."""
    msg = d.original(inter)
    if msg is None or int(msg["id"]) in d.deleted:
        return False
    return bool(msg.get("embeds")) or any(w in (msg.get("content") or "") for w in ("Queued", "Generating"))


async def settle(d, inters, timeout: float = 30.0) -> tuple[int, int]:
    """Wait until every request was answered; return (accepted, refused)."""
    await d.wait_for(lambda: all(refusal(d, i) or job_shown(d, i) for i in inters), timeout=timeout)
    refused = sum(1 for i in inters if refusal(d, i))
    return len(inters) - refused, refused


async def cancel_all(d, users, inters) -> None:
    """Each user cancels their latest job (with /cancel), so the next test starts on an empty queue."""
    for user in users:
        cancel = await d.invoke_slash(user, d.channel, "cancel")
        await d.wait_for(lambda: cancel.callbacks, timeout=10)
    await d.wait_for(lambda: all("canceled" in (d.original(i) or {}).get("content", "") for i in inters), timeout=60)


async def test_simultaneous_imagines_from_one_user_accept_exactly_one_within_the_cooldown(stack):
    d = stack.double
    inters = await asyncio.gather(*(d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": f"1girl, burst {n}",
                                                                                    **SLOW}) for n in range(10)))
    accepted, refused = await settle(d, inters)
    assert (accepted, refused) == (1, 9), [refusal(d, i) for i in inters]
    # The refusal says why and what is allowed, and no "thinking…" placeholder is left behind.
    assert all("one every 3 s" in refusal(d, i) for i in inters if refusal(d, i))
    assert not any(thinking(d, i) for i in inters if refusal(d, i))
    await cancel_all(d, [d.alice], [i for i in inters if job_shown(d, i)])


async def test_thirty_users_at_once_fill_the_global_queue_exactly(stack):
    d = stack.double
    users = [d._user(f"burst-user-{n}") for n in range(30)]
    inters = [await d.invoke_slash(u, d.channel, "imagine", {"prompt": "1girl, crowd", **SLOW}) for u in users]
    accepted, refused = await settle(d, inters, timeout=60)
    assert accepted == LIMITS["global_max_queued"], (accepted, refused)
    full = [refusal(d, i) for i in inters if refusal(d, i)]
    assert all("The queue is full" in t and "limit 10" in t for t in full), full
    winners = [u for u, i in zip(users, inters) if job_shown(d, i)]
    await cancel_all(d, winners, [i for i in inters if job_shown(d, i)])


async def test_double_click_on_reroll_starts_one_job(stack):
    d = stack.double
    first = await d.invoke_slash(d.bob, d.channel, "imagine", {"prompt": "1girl, double click", "steps": 2})
    msg = await d.wait_for(lambda: (m := d.original(first)) and m.get("embeds") and m, timeout=60)
    job = next(c["custom_id"] for row in msg["components"] for c in row["components"]
               if c["custom_id"].startswith("arcae:reroll:"))
    await asyncio.sleep(LIMITS["cooldown_s"] + 0.2)  # the first job's cooldown is over
    clicks = await asyncio.gather(d.click(d.bob, msg, job), d.click(d.bob, msg, job))
    accepted, refused = await settle(d, list(clicks))
    assert (accepted, refused) == (1, 1), [refusal(d, i) for i in clicks]
    # Finished before the next test counts the global queue.
    await d.wait_for(lambda: all(answered(d, i) for i in clicks if job_shown(d, i)), timeout=60)


def answered(d, inter) -> bool:
    """An image, or a clear failure message, on the interaction's own message (not "thinking…")."""
    msg = d.original(inter)
    if msg is None or thinking(d, inter):
        return False
    return bool(msg["attachments"]) or any(m in (msg.get("content") or "") for m in ("❌", "✖️"))


async def test_kill_9_right_after_the_acks_loses_no_job(stack):
    d = stack.double
    inters = [await d.invoke_slash(d.admin, d.channel, "imagine", {"prompt": f"1girl, crash {n}", "steps": 2})
              for n in range(6)]
    await d.wait_for(lambda: all(i.callbacks for i in inters), timeout=20)
    stack.bot.proc.kill()
    await stack.bot.proc.wait()
    assert all(i.callbacks[0]["type"] == 5 for i in inters), "each was acknowledged with a defer"
    await stack.bot.start(READY_LINE)
    try:
        await d.wait_for(lambda: all(answered(d, i) for i in inters), timeout=90)
    except AssertionError:
        stuck = [i.id for i in inters if not answered(d, i)]
        raise AssertionError(f"{len(stuck)} of 6 acknowledged jobs left 'thinking…' after a kill -9: {stuck}")


async def test_a_completion_whose_database_write_fails_is_retried_not_dropped(stack):
    d = stack.double
    inter = await d.invoke_slash(d.admin, d.channel, "imagine", {"prompt": "1girl, locked", "steps": 40})
    await d.wait_for(lambda: "Generating" in ((d.original(inter) or {}).get("content") or ""), timeout=60)
    await hold_write_lock_until_the_bot_fails_to_write(stack)  # while the job completes
    msg = await d.wait_for(lambda: answered(d, inter) and d.original(inter), timeout=60)
    assert msg["attachments"], msg.get("content")


async def hold_write_lock_until_the_bot_fails_to_write(stack) -> None:
    """Another process holds the database's write lock past the bot's busy timeout (5 s), then lets go."""
    log_start = len(stack.bot.log())
    holder = sqlite3.connect(stack.config.parent / "data" / "arcae.sqlite3", isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN IMMEDIATE")
        deadline = time.monotonic() + 60
        while "database is locked" not in stack.bot.log()[log_start:]:
            assert time.monotonic() < deadline, stack.bot.log()[-3000:]
            await asyncio.sleep(0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def run_row(stack, run_id: str) -> sqlite3.Row:
    with sqlite3.connect(stack.config.parent / "data" / "arcae.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM training_runs WHERE run_id = ?", (run_id,)).fetchone()


async def test_a_training_run_that_keeps_crashing_the_engine_is_stopped_and_the_admin_told(stack):
    d = stack.double
    images = {f"image{i + 1}": (f"c{i}.png", png((40 + 60 * i, 120, 200), 4 + 2 * i)) for i in range(3)}
    start = await invoke(d, d.admin, "train start", {"name": "crashy", "kind": "style", "trigger": "cr",
                                                     "steps": 5000, "sample_steps": 1}, files=images)
    run_id = (await answer(d, start, timeout=60))["content"].split("`")[1]
    sent = f"training run {run_id} (crashy) sent to the engine"
    for crash in range(MAX_ATTEMPTS):
        # The engine has (re)started the run and reports progress: then it dies under it (kill -9).
        await d.wait_for(lambda: stack.bot.log().count(sent) > crash, timeout=60)
        await d.wait_for(lambda: run_row(stack, run_id)["last_seq"] >= 1, timeout=60)
        stack.engine.proc.kill()
        await stack.engine.proc.wait()
        await stack.engine.start("ARCAE_ENGINE_READY", timeout=120)
    # Started once more: instead of a third crash, the run is stopped, recorded as failed, the admin told.
    notices = await d.wait_for(lambda: [m for m in d.followups(start) if "failed" in (m.get("content") or "")],
                               timeout=90)
    assert f"the engine stopped {MAX_ATTEMPTS} times" in notices[0]["content"], notices[0]["content"]
    assert run_row(stack, run_id)["status"] == "failed"
    await asyncio.sleep(8)  # a further reconnect must not resubmit it
    assert stack.bot.log().count(sent) == MAX_ATTEMPTS + 1


async def test_a_training_event_whose_database_write_fails_is_retried_not_dropped(tmp_path):
    """The bot's training side on a real SQLite file that another process keeps locked for a while."""
    from types import SimpleNamespace

    from bot.db import Database
    from bot.training_flow import TrainingFlow
    from engine.contract import protocol
    from engine.contract.config import parse_config

    db = await Database.open(tmp_path / "bot.sqlite3")
    holder = sqlite3.connect(tmp_path / "bot.sqlite3", isolation_level=None)
    try:
        flow = TrainingFlow(SimpleNamespace(db=db, config=parse_config({})))
        await flow.store.insert(run_id="r1", adapter_name="a", kind="style", trigger="t", dataset="a", run_dir="",
                                options={"steps": 6}, created_by=1, channel_id=None, guild_id=None)
        flow._active.add("r1")  # as after /train start sent it
        holder.execute("BEGIN IMMEDIATE")  # longer than the bot's busy timeout (5 s)
        failed = protocol.Failed(job_id="r1", attempt=1, seq=4, error="internal", message="CUDA out of memory")
        applying = asyncio.create_task(flow.on_event(failed))
        await asyncio.sleep(6.5)
        holder.execute("ROLLBACK")
        await asyncio.wait_for(applying, 30)
        run = await flow.store.get("r1")
        assert (run.status, run.error) == ("failed", "CUDA out of memory")
    finally:
        holder.close()
        await db.close()
