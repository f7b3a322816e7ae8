"""``python -m engine bench [--gpu]``: speed ratios on the tiny model (CPU) or full-size SDXL (GPU)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "benchmarks: CPU ratios on the tiny model (default) or the full-size SDXL suite on a GPU (--gpu)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", action="store_true", help="full-size SDXL architecture with random weights on CUDA")
    p.add_argument("--tiny", action="store_true", help="with --gpu: run the GPU suite's code on the tiny model (smoke test)")
    p.add_argument("--dtypes", default="fp16,bf16", help="with --gpu: comma-separated dtypes (fp16,bf16,fp32)")
    p.add_argument("--batches", default="1,4", help="with --gpu: comma-separated batch sizes")
    p.add_argument("--no-compile", action="store_true", help="with --gpu: skip the torch.compile case")
    p.add_argument("--trials", type=int, default=5, help="repeated trials per measurement; the median is reported")
    p.add_argument("--only", default="", help="CPU suite: comma-separated case names to run (default all)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--table", type=Path, default=None, metavar="F.json",
                   help="print the README performance table from a CPU bench JSON written by --out, and exit")


def run(args: argparse.Namespace) -> int:
    from engine.cli import CliError

    if args.table is not None:
        print(_table(args.table))
        return 0
    if args.trials < 1:
        raise CliError("--trials must be at least 1")
    if args.gpu:
        import torch

        from engine.benchmarks.gpu_bench import run_gpu_bench

        if not args.tiny and not torch.cuda.is_available():
            raise CliError("--gpu needs a CUDA device (torch.cuda.is_available() is False); use --gpu --tiny for a CPU smoke run")
        try:
            dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
            batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
        except ValueError:
            raise CliError("--batches takes integers, e.g. 1,4") from None
        bad = [d for d in dtypes if d not in ("fp16", "bf16", "fp32")]
        if bad:
            raise CliError(f"unknown dtype {bad[0]!r}; allowed: fp16, bf16, fp32")
        out = args.out or Path("bench-results") / "gpu.json"
        report = run_gpu_bench(tiny=args.tiny, dtypes=dtypes, batches=batches, compile_unet=not args.no_compile, trials=args.trials, out=out)
        print()
        print(report.table())
        print(f"\nJSON: {out}")
        return 0
    from engine.benchmarks.cpu_bench import CASES, run_cpu_bench

    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CASES]
    if unknown:
        raise CliError(f"unknown case {unknown[0]!r}; cases: {', '.join(CASES)}")
    run_cpu_bench(trials=args.trials, only=only or None, out=args.out)
    return 0


def _table(path: Path) -> str:
    """The markdown table of a CPU bench JSON (``CliError`` saying what is expected otherwise)."""
    import json

    from engine.benchmarks.ratios import markdown_table
    from engine.cli import CliError

    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"--table: cannot read {path}: {exc}") from None
    needed = {"what", "ratio", "numerator_s", "denominator_s"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and needed <= set(r) for r in rows):
        raise CliError(f"--table: {path} is not a CPU bench result (a JSON list of rows written by 'python -m engine bench --out')")
    return markdown_table(rows)
