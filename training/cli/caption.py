"""``python -m training caption DIR --kind character|style``: write NAME.txt beside each image."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.contract.config import CONFIG_HELP
from training.cli import CliError

HELP = "caption the images in DIR with the WD tagger: writes NAME.txt beside each image and prints a summary"


def add_tagger_arguments(p: argparse.ArgumentParser, *, kind_required: bool = True) -> None:
    """Options shared by ``caption`` and ``dataset import``."""
    if kind_required:
        p.add_argument("--kind", choices=("character", "style"), required=True, help="caption recipe")
    else:
        p.add_argument("--kind", choices=("character", "style"), default="character", help="caption recipe (default character)")
    p.add_argument("--trigger", default="", help="trigger word written first in every caption")
    p.add_argument("--tagger", default=None, help="hub repo id or local folder (model.onnx + selected_tags.csv); default: [tagger] model")
    p.add_argument("--general-threshold", type=float, default=None, help="general tag threshold 0-1 (default 0.35)")
    p.add_argument("--character-threshold", type=float, default=None, help="character tag threshold 0-1 (default 0.85)")
    p.add_argument("--mcut", action="store_true", default=None, help="MCut thresholds instead (character clamped to >= 0.15)")
    p.add_argument("--max-tags", type=int, default=None, help="general tags per caption (default 8 style, 40 character)")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder of images (not searched recursively)")
    add_tagger_arguments(p)
    p.add_argument("--skip-existing", action="store_true", help="leave images that already have a .txt alone")


def load_config_or_defaults(path: str | None):
    """The config file found by the commands' one rule (``engine.cli.load_cli_config``), else defaults."""
    from engine.cli import load_cli_config

    return load_cli_config(path)


def load_tagger_and_recipe(args: argparse.Namespace, config):
    """The tagger and caption recipe from ``[tagger]`` with command-line overrides."""
    from training.data.captions import CaptionError, CaptionRecipe
    from training.data.tagger import TaggerError, WDTagger

    for name in ("general_threshold", "character_threshold"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise CliError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}")
    if args.max_tags is not None and args.max_tags < 0:
        raise CliError(f"--max-tags must be 0 or more, not {args.max_tags}")
    tc = config.tagger
    updates = {
        k: v
        for k, v in {
            "model": args.tagger,
            "general_threshold": args.general_threshold,
            "character_threshold": args.character_threshold,
            "mcut": args.mcut,
        }.items()
        if v is not None
    }
    tc = tc.model_copy(update=updates)
    try:
        recipe = CaptionRecipe.from_config(tc, args.kind, trigger=args.trigger, max_tags=args.max_tags)
        tagger = WDTagger.from_config(tc, base_dir=None if args.tagger else config.base_dir)
    except (CaptionError, TaggerError) as exc:
        raise CliError(str(exc)) from None
    return tagger, recipe


def format_top(pairs, n: int = 12) -> str:
    return ", ".join(f"{tag} ({count})" for tag, count in list(pairs)[:n]) or "(none)"


def run(args: argparse.Namespace) -> int:
    from training.data.dataset_folder import caption_folder
    from training.data.tag_stats import tag_counts, top_tags

    folder = Path(args.dir)
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder")
    config = load_config_or_defaults(args.config)
    tagger, recipe = load_tagger_and_recipe(args, config)
    summary = caption_folder(folder, tagger, recipe, skip_existing=args.skip_existing)
    n = len(summary.captions)
    if n == 0 and not summary.skipped and not summary.refused:
        raise CliError(f"no images (.png, .jpg, .jpeg, .webp, .gif, .bmp) in {folder}")
    trigger = f", trigger {recipe.trigger!r}" if recipe.trigger else ""
    print(f"captioned {n} images in {folder} (kind {recipe.kind}{trigger}; tagger {tagger.source})")
    if n:
        lengths = [len(c.tags) for c in summary.captions.values()]
        print(f"tags per caption: mean {sum(lengths) / n:.1f}, min {min(lengths)}, max {max(lengths)}")
        results = list(summary.results.values())
        counts = tag_counts([t for t, _ in r.character] + [t for t, _ in r.general] for r in results)
        print(f"top tags: {format_top(top_tags(counts))}")
        print(f"ratings: {format_top(top_tags(tag_counts([r.rating] for r in results)))}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} images that already have a caption")
    for r in summary.refused:
        print(f"refused {r.name}: {r.reason}")
    return 0 if n or summary.skipped else 1
