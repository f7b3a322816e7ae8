"""Command-line dispatcher for ``python -m training`` (same conventions as ``engine.cli``)."""

from __future__ import annotations

from engine.cli import CliError, dispatch  # noqa: F401  (CliError re-exported for subcommands)

COMMANDS: dict[str, str] = {
    "caption": "training.cli.caption",
    "dataset": "training.cli.dataset",
    "train": "training.cli.train",
    "checkpoints": "training.cli.checkpoints",
    "drift": "training.cli.drift",
    "distill-fast": "training.cli.distill",
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m training", COMMANDS, argv)
