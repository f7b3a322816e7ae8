"""``python -m engine make-tiny-model DIR``: write a tiny random SDXL pipeline for tests and demos."""

from __future__ import annotations

import argparse

DEMO_CONFIG = "arcae-tiny.toml"
HELP = "write a tiny, randomly initialised SDXL pipeline (diffusers format) for tests, demos and CPU benchmarks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weights are deterministic for a seed (default 0)")
    p.add_argument("--prediction", choices=["epsilon", "eps", "v"], default="epsilon",
                   help="what the UNet predicts: epsilon (noise, default) or v (a v-prediction model, as NoobAI-XL V-Pred)")


def run(args: argparse.Namespace) -> int:
    from engine.generation.tiny import make_tiny_model

    import sys

    from engine.generation.tiny import write_tiny_config

    path = make_tiny_model(args.dir, seed=args.seed, prediction=args.prediction)
    config = write_tiny_config(path, path, name=DEMO_CONFIG)
    print(path)
    print(f"demo config (CPU, 64 px; data under {path}): {config}", file=sys.stderr)
    print(f'try: python -m engine generate "1girl, solo" --config {config}', file=sys.stderr)
    return 0
