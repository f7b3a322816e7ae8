"""The benchmarks run: the GPU suite's code on the tiny model, and a CPU case end to end."""

from __future__ import annotations

import json

import pytest

from engine.benchmarks.gpu_bench import peak_for, run_gpu_bench


def test_gpu_suite_code_runs_on_the_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    # The compile path runs too (dynamo's eager backend: inductor's C++ builds take minutes per graph here).
    report = run_gpu_bench(tiny=True, dtypes=("fp32",), batches=(1,), trials=1, compile_unet=True, out=out, device="cpu",
                           compile_backend="eager")
    names = [c.name for c in report.cases]
    for expected in ("std 4 steps CFG", "VAE decode", "train step", "unfused", "fused", "end to end"):
        assert any(expected in n for n in names), (expected, names)
    # Arcae's own Generator end to end, as production runs it: eager, fused and compiled.
    for execution in ("unfused", "fused", "compiled"):
        for case in ("Arcae LCM 4 64x64 2 LoRAs + LCM", "Arcae LCM 6 64x96 2 LoRAs + LCM", "Arcae 4 steps CFG 64x64 2 LoRAs"):
            assert f"{case}, {execution}" in names, (case, execution, names)
    assert all(c.seconds > 0 for c in report.cases)
    # SDXL FLOP counts mean nothing for the tiny model: no TFLOP/s is claimed.
    assert all(c.tflops is None for c in report.cases)
    saved = json.loads(out.read_text())
    assert saved["tiny"] is True and len(saved["cases"]) == len(report.cases)
    assert "case" in report.table().splitlines()[0]


def test_issue_15_rows_run_on_small_inputs():
    """The scheduler and SQLite rows (the fusion case's cheap part) run and report both sides."""
    from engine.benchmarks.fusion_bench import bench_scheduler, bench_sqlite

    rows = [bench_scheduler(), *bench_sqlite(rows=2_000)]
    assert [r.case for r in rows] == ["scheduler_1000_vs_10", "sqlite_undelivered_1m", "sqlite_count_active_guild_1m"]
    assert all(r.numerator_s > 0 and r.denominator_s > 0 for r in rows)


def test_device_peaks_are_matched_most_specific_first():
    assert peak_for("NVIDIA H100 PCIe") == 756.0
    assert peak_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for("NVIDIA H200") == 989.0
    assert peak_for("Some CPU") is None


def test_cpu_bench_prints_a_ratio(tmp_path, capsys):
    from engine.benchmarks.cpu_bench import run_cpu_bench

    results = run_cpu_bench(trials=1, only=["fast"], out=tmp_path / "cpu.json")
    assert len(results) == 1 and results[0].ratio > 1.0  # 4 LCM steps beat 28 steps with CFG
    assert "standard 28 steps CFG / fast LCM 4 steps" in capsys.readouterr().out


def test_unknown_cpu_case_is_refused(capsys):
    from engine.benchmarks.cpu_bench import run_cpu_bench
    from engine.cli import main

    with pytest.raises(ValueError, match="unknown case 'warp'"):
        run_cpu_bench(trials=1, only=["warp"])
    assert main(["bench", "--only", "warp"]) == 2
    assert "error: unknown case 'warp'; cases: service, mix" in capsys.readouterr().err


@pytest.mark.cuda
def test_full_size_sdxl_lcm_step_on_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (full-size SDXL)")
    report = run_gpu_bench(dtypes=("bf16",), batches=(1,), trials=1, compile_unet=False, out=tmp_path / "g.json")
    assert all(c.tflops and c.tflops > 0 for c in report.cases if c.unet_evals or c.decodes)
