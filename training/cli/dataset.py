"""``python -m training dataset import ZIP_OR_DIR --name NAME``: intake + captions into a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli import CliError
from training.cli.caption import add_tagger_arguments, format_top, load_config_or_defaults, load_tagger_and_recipe

HELP = "manage training datasets: 'import' checks and captions a .zip or folder into <storage.datasets_dir>/NAME"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="import a .zip or a folder of images as a captioned dataset")
    imp.add_argument("source", metavar="ZIP_OR_DIR", help="a .zip archive or a folder of images (+ optional NAME.txt captions)")
    imp.add_argument("--name", required=True, help="dataset name (letters, digits, '_', '-', '.')")
    add_tagger_arguments(imp, kind_required=False)
    imp.add_argument("--replace", action="store_true", help="replace an existing dataset of that name")


def run(args: argparse.Namespace) -> int:
    from training.data.dataset_folder import check_dataset_name, import_dataset
    from training.data.intake import IntakeLimits, IntakeRefused

    source = Path(args.source)
    if not source.exists():
        raise CliError(f"{source} does not exist (give a .zip file or a folder)")
    try:
        check_dataset_name(args.name)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    config = load_config_or_defaults(args.config)
    tagger, recipe = load_tagger_and_recipe(args, config)
    datasets_dir = config.path(config.storage.datasets_dir)
    try:
        result = import_dataset(
            source,
            name=args.name,
            datasets_dir=datasets_dir,
            tagger=tagger,
            recipe=recipe,
            limits=IntakeLimits.from_config(config.intake),
            replace=args.replace,
        )
    except IntakeRefused as exc:
        raise CliError(f"import refused, nothing was kept: {exc.reason}") from None
    m = result.manifest
    print(f"dataset {args.name!r} created at {result.path}: {len(m['images'])} images accepted, {len(m['refused'])} refused")
    for im in m["images"]:
        print(f"  accepted {im['source']} -> {im['file']} [{im['rating']}] {im['caption']}")
    for r in m["refused"]:
        print(f"  refused {r['name']}: {r['reason']}")
    stats = m["stats"]
    print(f"tags per caption: mean {stats['tags_per_caption']['mean']}, keep_tokens {m['keep_tokens']}")
    print(f"top tags: {format_top(stats['top_tags']['character'] + stats['top_tags']['general'])}")
    print(f"signature tags: {', '.join(m['signature_tags']) or '(none)'}")
    from training.data.dataset_folder import chart_path

    print(f"tag chart: {chart_path(result.path)}")
    return 0
