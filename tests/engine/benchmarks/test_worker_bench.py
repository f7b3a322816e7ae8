"""The worker case of ``python -m engine bench``: its rows, their ids, and the printed table."""

from __future__ import annotations

import json


def test_worker_rows_have_stable_ids_and_the_table_prints_them(tmp_path, capsys):
    from engine.benchmarks.cpu_bench import run_cpu_bench
    from engine.cli import main

    out = tmp_path / "cpu.json"
    results = run_cpu_bench(trials=1, only=["worker"], out=out)
    ids = [r.id for r in results]
    assert ids == ["encode_cache_hit_50_vs_2", "train_switch_50_vs_2", "worker_pipeline_share", "png_level_4_vs_6"]
    assert all(r.ratio > 0 and "torch threads" in r.note for r in results)
    share = results[2]
    assert 0 < share.ratio <= 1.0
    capsys.readouterr()
    assert main(["bench", "--table", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| row | what | ratio |")
    for row_id in ids:
        assert f"| `{row_id}` |" in table
    assert [row["id"] for row in json.loads(out.read_text())] == ids


def test_table_refuses_a_file_that_is_not_a_cpu_result(tmp_path, capsys):
    from engine.cli import main

    bad = tmp_path / "gpu.json"
    bad.write_text('{"rows": []}', encoding="utf-8")
    assert main(["bench", "--table", str(bad)]) == 2
    assert "is not a CPU bench result" in capsys.readouterr().err
