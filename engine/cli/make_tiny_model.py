"""``python -m engine make-tiny-model DIR``: write a tiny random SDXL pipeline for tests and demos."""

from __future__ import annotations

import argparse

HELP = "write a tiny, randomly initialised SDXL pipeline (diffusers format) for tests, demos and CPU benchmarks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weights are deterministic for a seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from engine.tiny import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed)
    print(path)
    return 0
