"""The bot's parts without Discord or the engine: database, rules, embeds, files, start-up errors."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sqlite3
import subprocess
from types import SimpleNamespace

import pytest
from PIL import Image as PILImage

from bot import db as db_module
from bot.cogs.imagine import list_autocomplete, split_names
from bot.db import Database, Image, UserSettings
from bot.delivery import Delivery, Prepared, batches, fit_to_limit
from bot.embeds import params_embed, truncate
from bot.errors import InvalidOption, Refused
from bot.policy import aspect_size, blocked_tags_in, check_content, check_limits, check_ranges, content_rules
from engine.contract import protocol
from engine.contract.config import parse_config
from engine.benchmarks.discord_double import DiscordDouble
from tests.conftest import PYTHON, REPO

CONFIG = parse_config({"generation": {"size": "64x64", "min_side": 32, "max_side": 256, "max_pixels": 65536}})


def test_bot_never_imports_torch():
    code = ("import sys, bot.app, bot.__main__, bot.actions, bot.engine_link\n"
            "import bot.cogs.imagine, bot.cogs.jobs, bot.cogs.settings, bot.cogs.adapters, bot.cogs.gallery,"
            " bot.cogs.admin\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_no_token_exits_with_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ARCAE_DISCORD_TOKEN"}
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    out = subprocess.run([PYTHON, "-m", "bot", "--config", str(tmp_path / "config.toml")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "ARCAE_DISCORD_TOKEN" in out.stderr and "Reset Token" in out.stderr and "Developer Portal" in out.stderr


async def test_the_engine_child_gets_its_secret_but_not_the_discord_token(tmp_path, monkeypatch):
    from bot.engine_child import READY_PREFIX, EngineSupervisor

    monkeypatch.setenv("ARCAE_DISCORD_TOKEN", "discord-token-value")
    fake_python = tmp_path / "python"  # stands in for `python -m engine serve`: records its environment
    fake_python.write_text(f"#!/bin/sh\nenv > {tmp_path / 'env.txt'}\necho '{READY_PREFIX} ws://127.0.0.1:1/ws'\n"
                           "exec sleep 30\n")
    fake_python.chmod(0o755)
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    supervisor = EngineSupervisor(tmp_path / "config.toml", parse_config({}), python=str(fake_python), grace_s=5)
    try:
        assert await supervisor.start() == "ws://127.0.0.1:1/ws"
    finally:
        await supervisor.close()
    env = (tmp_path / "env.txt").read_text()
    assert f"ARCAE_ENGINE_SECRET={supervisor.secret}" in env
    assert "discord-token-value" not in env


async def test_bad_token_exits_with_what_to_do(tmp_path):
    double = DiscordDouble()
    await double.start()
    try:
        (tmp_path / "config.toml").write_text(
            f'[discord]\napi_base = "{double.api_base}"\ngateway_url = "{double.gateway_url}"\n'
            '[engine]\nmode = "remote"\nport = 9\n[storage]\ndatabase = "db.sqlite3"\n', encoding="utf-8")
        env = {**os.environ, "ARCAE_DISCORD_TOKEN": "not-the-token"}
        proc = await __import__("asyncio").create_subprocess_exec(
            PYTHON, "-m", "bot", "--config", str(tmp_path / "config.toml"), cwd=REPO, env=env,
            stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        _, err = await proc.communicate()
    finally:
        await double.close()
    text = err.decode()
    assert proc.returncode == 2, text[-2000:]
    assert "refused the token" in text and "Reset Token" in text and "not-the-token" not in text
    assert double.calls_to("GET", "/users/@me"), "the token was checked against Discord (the double)"


# ---------------------------------------------------------------------- database


def completed(job_id: str, seq: int = 5) -> protocol.Completed:
    params = protocol.ResolvedParams(prompt="1girl", negative_prompt="bad", seed=11, steps=2, cfg=5.0, width=64,
                                     height=64, count=1, sampler="Euler a", adapters=[], fast=False)
    image = protocol.ImageResult(path="/x/a.png", seed=11, width=64, height=64, sha256="ab" * 32, rating="general")
    return protocol.Completed(job_id=job_id, attempt=1, seq=seq, images=[image], params=params)


async def test_database_migrates_once_in_wal_and_keeps_results_idempotently(tmp_path):
    path = tmp_path / "arcae.sqlite3"
    db = await Database.open(path)
    try:
        assert await db.migrate() == [], "a second run applies nothing"
        await db.insert_job(job_id="j1", user_id=1, guild_id=2, channel_id=3, kind="txt2img",
                            params=protocol.GenerationParams(prompt="1girl"), nsfw_channel=False)
        assert await db.count_active(1) == 1
        assert await db.record_completion("j1", completed("j1")) is True
        assert await db.record_completion("j1", completed("j1")) is False, "a duplicate event stores nothing"
        job = await db.get_job("j1")
        assert job.status == "completed" and job.resolved.seed == 11 and job.delivered_at is None
        assert [j.job_id for j in await db.undelivered()] == ["j1"], "undelivered results survive a restart"
        assert [j.job_id for j in await db.jobs_by_seed(11, user_id=1)] == ["j1"]
        assert await db.jobs_by_seed(11, user_id=9) == [], "another user's seed finds nothing"
        assert [j.job_id for j in await db.jobs_by_seed(11, guild_id=2)] == ["j1"]
        assert await db.jobs_by_seed(11, guild_id=8) == [], "another server's seed finds nothing"
        await db.save_settings(1, UserSettings(fast=True, aspect="2:3"))
        assert await db.settings(1) == UserSettings(fast=True, aspect="2:3")
        await db.set_gallery_message("j1", 5, 77)
        assert await db.add_star(77, 100) == 1 and await db.add_star(77, 100) == 1 and await db.add_star(77, 101) == 2
        assert await db.add_star(78, 100) is None, "a reaction on another message is not a star"
        await db.audit(user_id=9, guild_id=2, action="cancel_job", target="j1")
        assert (await db.audit_entries(2))[0]["action"] == "cancel_job"
        assert await db.audit_entries(8) == [], "another server's audit log is its own"
    finally:
        await db.close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_concurrent_transactions_on_the_shared_connection_do_not_collide(tmp_path):
    # A result arriving while the adapter catalog is saved: both open a transaction on the one
    # connection; without serializing them the second BEGIN fails and the result is lost.
    db = await Database.open(tmp_path / "tx.sqlite3")
    try:
        for n in range(5):
            await db.insert_job(job_id=f"j{n}", user_id=1, guild_id=2, channel_id=3, kind="txt2img",
                                params=protocol.GenerationParams(prompt="1girl"), nsfw_channel=False)
        adapters = [protocol.AdapterInfo(name=f"style{n}", kind="style") for n in range(20)]
        results = await asyncio.gather(db.save_adapters(adapters),
                                       *(db.record_completion(f"j{n}", completed(f"j{n}")) for n in range(5)))
        assert results[1:] == [True] * 5
        assert [(await db.get_job(f"j{n}")).status for n in range(5)] == ["completed"] * 5
        assert len(await db.load_adapters()) == 20
    finally:
        await db.close()


async def test_failed_migration_changes_nothing(tmp_path, monkeypatch):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_init.sql").write_text((db_module.MIGRATIONS_DIR / "0001_init.sql").read_text())
    (migrations / "0002_broken.sql").write_text("CREATE TABLE extra (x INTEGER);\nTHIS IS NOT SQL;\n")
    monkeypatch.setattr(db_module, "MIGRATIONS_DIR", migrations)
    with pytest.raises(sqlite3.OperationalError):
        await Database.open(tmp_path / "x.sqlite3")
    con = sqlite3.connect(tmp_path / "x.sqlite3")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "jobs" not in tables and "extra" not in tables
    assert con.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == 0


# ---------------------------------------------------------------------- rules


def test_blocked_tags_match_whole_tags_only():
    assert blocked_tags_in("1girl, Nude, beach", CONFIG) == ["nude"]
    assert blocked_tags_in("sexy pose, sussex landscape", CONFIG) == []
    with pytest.raises(Refused, match="not age-restricted"):
        check_content("1girl, naked", nsfw_channel=False, config=CONFIG)
    check_content("1girl, naked", nsfw_channel=True, config=CONFIG)


def test_option_ranges_say_what_is_allowed():
    with pytest.raises(InvalidOption) as err:
        check_ranges(CONFIG, prompt="x", steps=0, cfg=None, count=9, seed=-1, weights={"style_weight": 5.0})
    text = err.value.message
    for part in ("steps must be between 1 and 60", "count must be between 1 and 4", "seed must be between 0",
                 "style_weight must be between -4 and 4"):
        assert part in text


def test_aspect_sizes():
    assert aspect_size("2:3", parse_config({})) == (832, 1216)
    w, h = aspect_size("2:3", CONFIG)
    assert w % 8 == 0 and h % 8 == 0 and h > w and abs(w * h - 64 * 64) < 64 * 64 * 0.3
    with pytest.raises(InvalidOption, match="aspect must be one of"):
        aspect_size("7:1", CONFIG)


def test_list_autocomplete_completes_the_last_item():
    names = ["alice-v2", "bob", "alicia"]
    choices = list_autocomplete("bob, ali", names)
    assert [c.value for c in choices] == ["bob, alice-v2", "bob, alicia"]
    assert split_names(" a, ,b, a ") == ["a", "b"]


# ---------------------------------------------------------------------- what users see


def _job(prompt: str) -> db_module.Job:
    return db_module.Job(job_id="j", user_id=1, guild_id=2, channel_id=3, kind="txt2img", status="completed",
                         params=protocol.GenerationParams(prompt=prompt), source_image=None, parent_job_id=None,
                         resolved=None, nsfw_channel=False, attempt=1, last_seq=0, error=None, interaction_id=None,
                         interaction_token=None, application_id=None, attachment_limit=None, message_id=None,
                         created_at=0.0, started_at=None, finished_at=None, delivered_at=None, elapsed_s=1.5)


def test_long_prompt_is_truncated_within_discord_limits():
    embed = params_embed(_job("masterpiece, " * 1500))
    assert len(embed) <= 6000 and embed.description.endswith("…")
    assert truncate("abc", 3) == "abc" and truncate("abcd", 3) == "ab…"


def _png(size: int) -> bytes:
    image = PILImage.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_files_fit_the_upload_limit():
    files = [Prepared(f"{i}.png", b"x" * 400, False) for i in range(4)]
    assert [len(g) for g in batches(files, 1000)] == [2, 2]
    big = _png(256)
    small = fit_to_limit(big, len(big) // 4)
    assert len(small) <= len(big) // 4 and small[:2] == b"\xff\xd8"


def test_sfw_rules_withhold_or_spoiler_flagged_images(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(_png(8))
    images = [Image("j", i, str(p), i, 8, 8, "0" * 64, rating, None, None, 0)
              for i, (p, rating) in enumerate(zip(paths, ["general", "explicit"]))]
    # Results are read only from the outputs folder.
    config = parse_config({"storage": {"outputs_dir": str(tmp_path)}})
    delivery = Delivery(SimpleNamespace(config=config))
    files, notes = delivery.prepare(_job("x"), images, content_rules(False, config), 10_000_000)
    assert len(files) == 1 and "withheld" in notes[0] and "explicit" in notes[0]
    files, notes = delivery.prepare(_job("x"), images, content_rules(True, config), 10_000_000)
    assert len(files) == 2 and not notes, "age-restricted channels get everything"
    spoiler = parse_config({"content": {"sfw_action": "spoiler"}, "storage": {"outputs_dir": str(tmp_path)}})
    files, _ = Delivery(SimpleNamespace(config=spoiler)).prepare(_job("x"), images, content_rules(False, spoiler), 10**7)
    assert [f.spoiler for f in files] == [False, True]


async def test_limits_refuse_with_the_reason_and_spare_admins(tmp_path):
    config = parse_config({"limits": {"max_queued_per_user": 2, "cooldown_s": 60.0, "global_max_queued": 3}})
    db = await Database.open(tmp_path / "limits.sqlite3")
    try:
        await check_limits(db, 1, False, config)  # nothing queued yet
        for i in range(2):
            await db.insert_job(job_id=f"a{i}", user_id=1, guild_id=None, channel_id=3, kind="txt2img",
                                params=protocol.GenerationParams(prompt="x"), nsfw_channel=False)
        with pytest.raises(Refused, match="the limit is 2"):
            await check_limits(db, 1, False, config)
        await db.finish("a0", "canceled")
        with pytest.raises(Refused, match="Cooldown: you can start a new job in"):
            await check_limits(db, 1, False, config)
        for i in range(2):
            await db.insert_job(job_id=f"b{i}", user_id=2 + i, guild_id=None, channel_id=3, kind="txt2img",
                                params=protocol.GenerationParams(prompt="x"), nsfw_channel=False)
        with pytest.raises(Refused, match="The queue is full"):
            await check_limits(db, 9, False, config)
        await check_limits(db, 1, True, config)  # admins are exempt
    finally:
        await db.close()


async def test_restart_resubmits_running_jobs_once_then_fails_them_honestly(tmp_path):
    from bot.job_manager import JobManager

    db = await Database.open(tmp_path / "resume.sqlite3")
    try:
        for job_id, attempt in (("first", 1), ("second", 2)):
            await db.insert_job(job_id=job_id, user_id=1, guild_id=None, channel_id=3, kind="txt2img",
                                params=protocol.GenerationParams(prompt="x"), nsfw_channel=False)
            await db.set_attempt(job_id, attempt)
            await db.mark_running(job_id, attempt, 0)
        config = parse_config({"storage": {"outputs_dir": str(tmp_path / "outputs")}})
        jobs = JobManager(SimpleNamespace(config=config, db=db))  # no engine yet: jobs stay pending
        await jobs.resubmit_unfinished()
        first, second = await db.get_job("first"), await db.get_job("second")
        assert (first.status, first.attempt) == ("pending", 2), "a job that was running gets a second attempt"
        assert second.status == "failed" and "twice" in second.error, "no third attempt"
        # Events of the superseded attempt change nothing; a duplicate result is stored once.
        await jobs.on_event(protocol.Started(job_id="first", attempt=1, seq=3))
        assert (await db.get_job("first")).status == "pending"
        await jobs.on_event(protocol.Started(job_id="first", attempt=2, seq=1))
        assert (await db.get_job("first")).status == "running"
        # A result is its image bytes (the path in the event is never read).
        result = completed("first", seq=4)
        image = result.images[0].model_copy(update={"sha256": "", "data_b64": base64.b64encode(_png(8)).decode()})
        result = result.model_copy(update={"attempt": 2, "images": [image]})
        await jobs.on_event(result)
        await jobs.on_event(result)
        assert (await db.get_job("first")).status == "completed" and len(await db.images("first")) == 1
    finally:
        await db.close()
