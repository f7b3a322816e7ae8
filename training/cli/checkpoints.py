"""``python -m training checkpoints RUN_DIR``: score a run's checkpoints, recommend one, record a choice."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.contract.config import CONFIG_HELP

HELP = "score a training run's checkpoints (WD tagger), print the table, record the chosen one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory (holds run.json and checkpoints/)")
    p.add_argument("--choose", type=int, metavar="STEP", help="record this checkpoint as the chosen one")
    p.add_argument("--tagger", help="WD tagger: hub id or folder (default: [tagger] model of the config file)")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--rescore", action="store_true", help="score again even if run.json has scores")
    p.add_argument("--pixels", action="store_true", help="score without a tagger (pixel similarity only)")


def run(args: argparse.Namespace) -> int:
    from engine.cli import load_cli_config
    from engine.contract.config import locate_config
    from training.data.checkpoints import CheckpointScore, choose_checkpoint, format_table, score_run, tagger_tag_fn
    from training.cli import CliError
    from engine.contract.training_errors import TrainingError
    from training.data.run_record import read_run

    run_dir = Path(args.run_dir)
    try:
        record = read_run(run_dir)
        if args.choose is not None:
            choose_checkpoint(run_dir, args.choose)
        scores = [CheckpointScore(**s) for s in record.get("scores") or []]
        if args.rescore or not scores:
            config = load_cli_config(args.config)
            source = args.tagger or (config.tagger.model if locate_config(args.config) else "")
            if not source and not args.pixels:
                raise CliError("no scores yet: pass --tagger DIR_OR_ID (or --config, or --pixels to score without one)")
            tag_fn = None
            if source and not args.pixels:
                from training.data.tagger import WDTagger

                t = config.tagger
                try:
                    tag_fn = tagger_tag_fn(WDTagger.load(source, general_threshold=t.general_threshold,
                                                         character_threshold=t.character_threshold))
                except Exception as exc:
                    raise CliError(f"cannot load tagger {source}: {exc}") from None
            scores = score_run(run_dir, tag_fn)
        record = read_run(run_dir)
    except TrainingError as exc:
        raise CliError(str(exc)) from None
    if not scores:
        raise CliError(f"run {run_dir} has no checkpoints with samples to score")
    print(format_table(scores, record.get("recommended_checkpoint"), record.get("chosen_checkpoint")))
    chosen = record.get("chosen_checkpoint")
    print(f"recommended: step {record.get('recommended_checkpoint')}; chosen: {'step ' + str(chosen) if chosen is not None else 'none'}")
    return 0
