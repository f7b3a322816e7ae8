"""Smoke test of the benchmark's ``ack`` case: the real bot and engine, three simultaneous /imagine."""

from __future__ import annotations

import re

from engine.benchmarks.bot_bench import bench_ack


def test_bench_ack_measures_every_acknowledgement():
    ratios = bench_ack(trials=1, n=3)
    assert [r.case for r in ratios] == ["ack", "ack"]
    median, p95 = ratios
    share = re.search(r"acked within 3 s: ([\d.]+)% \((\d+)/(\d+)\)", median.note)
    assert share, median.note
    # One alone and three together, all deferred within Discord's window (the warm-up is not counted).
    assert share.group(1) == "100.0" and share.group(2) == share.group(3) == "4", median.note
    for r in ratios:
        assert 0 < r.numerator_s < 3.0 and 0 < r.denominator_s < 3.0, r.line()
        assert r.ratio > 0 and r.ratio == r.numerator_s / r.denominator_s, r.line()
