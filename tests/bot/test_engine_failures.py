"""The engine's failures as users read them (bot.engine_failures): the error code decides the sentence,
in the user's language; the engine's detail is kept only where it helps, and never a host path."""

from __future__ import annotations

from bot.engine_failures import failure_reason, job_failed, stored_failure


def test_each_code_reads_as_a_sentence_in_the_users_language():
    oom = job_failed("j1", "out_of_memory", "CUDA out of memory. Tried to allocate 2.00 GiB at /opt/arcae/x.py")
    assert str(oom) == ("❌ Job `j1` failed: the GPU ran out of memory; try a smaller size, fewer images or "
                        "fewer adapters")
    assert oom.render("ja").startswith("❌ ジョブ `j1` は失敗しました: GPU のメモリが足りなくなりました")
    assert oom.render("zh-CN").startswith("❌ 任务 `j1` 失败：GPU 显存不足")


def test_detail_is_kept_where_it_helps_and_paths_never_shown():
    reason = failure_reason("incompatible_adapter", "adapter 'hero-b' (/srv/arcae/adapters/hero-b.safetensors) "
                                                    "does not fit the base model")
    assert "hero-b" in str(reason) and "/srv" not in str(reason) and "…" in str(reason)
    # A model problem names files of the engine's host: the user is told without the engine's words.
    missing = failure_reason("model_missing", "/home/op/models/sdxl is not a diffusers model folder")
    assert "/home" not in missing.render("ja") and "models" not in str(missing)


def test_a_limit_sentence_from_the_engine_is_translated_and_unknown_codes_stay_vague():
    reason = failure_reason("bad_request", "steps must be between 1 and 60 (got 500)")
    assert reason.render("ja") == "エンジンがリクエストを拒否しました: steps は 1 から 60 の範囲で指定してください（指定値: 500）"
    assert "internal error" in str(failure_reason("something_new", "Traceback ... secret=abc"))
    assert "secret" not in str(failure_reason("something_new", "Traceback ... secret=abc"))


def test_a_stored_error_is_shown_the_same_way_after_a_restart():
    assert stored_failure("j2", "queue_full: queue is full (50 jobs)").render("zh-CN") == \
        "❌ 任务 `j2` 失败：引擎队列已满；请一分钟后再试"
    assert str(stored_failure("j3", "engine stopped during the job twice")) == \
        "❌ Job `j3` failed: engine stopped during the job twice"
