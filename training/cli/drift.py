"""``python -m training drift``: how far each installed few-step mode drifts from the standard mode.

For a base + adapter mix and fixed prompts and seeds, makes the standard image and every fast-mode
image (LCM-LoRA weights and step counts swept), compares them (WD-tagger recall of the prompt's
tags, colour statistics, SSIM), prints the table and the recommendation, and writes ``drift.json``
and ``drift.png`` (see ``training.data.drift_report`` for the scoring rule).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from engine.contract.config import CONFIG_HELP

HELP = "measure each fast mode against the standard mode (tag recall, colour, SSIM) and recommend one"
_ADAPTER = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]{0,63})(?::(?P<weight>-?[0-9.]+))?")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="a LoRA of the mix every image runs with (repeatable; default: no adapter)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a fixed prompt (repeatable; default: four built-in anime prompts; with --checkpoint the run's sample prompts)")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    p.add_argument("--modes", default="", help="fast modes to measure, comma-separated recipes or adapters (default: every installed one)")
    p.add_argument("--lcm-weights", default="0.25,0.5,0.75,1.0", help="LCM-LoRA weights to sweep (0.1-1.5; default 0.25,0.5,0.75,1.0)")
    p.add_argument("--steps", default="4-8", help="step counts to sweep, e.g. 4-8 or 4,6,8 (1-8; default 4-8)")
    p.add_argument("--checkpoint", metavar="RUN_DIR[:STEP]",
                   help="measure a training run's checkpoint (default step: chosen, else recommended) in the mix; "
                        "the report goes to RUN_DIR/drift and its summary into the run's run.json")
    p.add_argument("--out", metavar="DIR", help="report folder (default: [storage] runs_dir/drift-TIMESTAMP)")
    p.add_argument("--tagger", metavar="DIR_OR_ID", help="WD tagger (default: [tagger] model)")
    p.add_argument("--no-tagger", action="store_true", help="measure without a tagger (no tag recall)")


def _mix(values: list[str]) -> list[tuple[str, float | None]]:
    from training.cli import CliError

    mix = []
    for value in values:
        m = _ADAPTER.fullmatch(value.strip())
        weight = None
        try:
            weight = float(m["weight"]) if m and m["weight"] is not None else None
        except ValueError:
            m = None
        if not m or (weight is not None and not -4.0 <= weight <= 4.0):
            raise CliError(f"bad --adapter {value!r}: use NAME or NAME:WEIGHT, weight -4 to 4 (e.g. mystyle:0.8)")
        mix.append((m["name"], weight))
    return mix


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from training.cli import CliError
    from training.data import drift_report as dr

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CliError(f"--seeds {args.seeds!r}: give comma-separated whole numbers, e.g. 1,2") from None
    if not seeds or any(not 0 <= s < 2**32 for s in seeds):
        raise CliError(f"--seeds {args.seeds!r}: give one or more seeds 0-{2**32 - 1}")
    try:
        weights = dr.parse_floats(args.lcm_weights, "--lcm-weights", 0.1, 1.5)
        steps = dr.parse_steps(args.steps)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return dict(mix=_mix(args.adapter), prompts=list(args.prompt), seeds=seeds,
                modes=[m for m in args.modes.split(",") if m.strip()], lcm_weights=weights, steps=steps)


def _tagger(args: argparse.Namespace, config: Any) -> tuple[Any, str]:
    from training.cli import CliError
    from training.data.checkpoints import tagger_tag_fn
    from training.data.tagger import WDTagger

    if args.no_tagger:
        return None, ""
    source = args.tagger or config.tagger.model
    t = config.tagger
    try:
        if args.tagger:
            tagger = WDTagger.load(source, general_threshold=t.general_threshold, character_threshold=t.character_threshold)
        else:
            tagger = WDTagger.from_config(t, base_dir=config.base_dir)
    except Exception as exc:  # missing model, broken file: say which and how to go on
        raise CliError(f"cannot load the WD tagger {source}: {exc} (or pass --no-tagger)") from None
    return tagger_tag_fn(tagger), source


def _checkpoint(value: str) -> tuple[Path, int | None]:
    """``RUN_DIR`` or ``RUN_DIR:STEP``."""
    head, sep, tail = value.rpartition(":")
    if sep and tail.isdigit():
        return Path(head), int(tail)
    return Path(value), None


def run(args: argparse.Namespace) -> int:
    from engine.cli import load_cli_config
    from engine.contract.errors import EngineError
    from training.cli import CliError
    from training.data import drift_report as dr

    config = load_cli_config(args.config)
    settings = _settings(args)
    tag_fn, tagger_name = _tagger(args, config)
    out = Path(args.out) if args.out else Path(config.path(config.storage.runs_dir)) / time.strftime("drift-%Y%m%d-%H%M%S")

    from engine.generation.generator import Generator
    from training.learning.drift import DriftRun, checkpoint_run

    try:
        generator = Generator.from_config(config)
        if args.checkpoint:
            run_dir, step = _checkpoint(args.checkpoint)
            run = checkpoint_run(generator, run_dir, step, out_dir=Path(args.out) if args.out else None,
                                 tag_fn=tag_fn, tagger_name=tagger_name, **settings)
            out = run.out_dir
        else:
            settings["prompts"] = settings["prompts"] or list(dr.DEFAULT_PROMPTS)
            run = DriftRun(generator, out, tag_fn=tag_fn, tagger_name=tagger_name, **settings)
        print(f"measuring {len(run.tasks)} images ({len(run.modes)} fast mode(s))", file=sys.stderr)
        report = run.run_all()
    except EngineError as exc:
        raise CliError(exc.message) from None
    print(dr.format_table(report))
    print(dr.summary_line(report))
    print(out / dr.REPORT_JSON)
    print(out / dr.REPORT_PNG)
    return 0
