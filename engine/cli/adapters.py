"""``python -m engine adapters``: list the LoRA adapters of a directory (no model is loaded)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.contract.config import CONFIG_HELP

HELP = "list LoRA adapters: name, kind, trigger words, default weight, file format, hashes"

# HASH: the file's sha256 (first 10 hex); A1111: the 12-hex hash A1111 and Civitai show and put in
# "Lora hashes" (sha256 of the tensor data after the header, so metadata edits keep it).
_COLUMNS = ("NAME", "KIND", "TRIGGERS", "WEIGHT", "FORMAT", "HASH", "A1111")
_MAX_TRIGGERS_CHARS = 48


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters-dir", metavar="DIR", help="adapters directory (default: [adapters] dir of the config)")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print the adapters as JSON instead of a table")


def _settings(args: argparse.Namespace) -> tuple[Path, float, str]:
    """(adapters dir, default weight, LCM adapter name) from the arguments and the config."""
    from engine.cli import load_cli_config

    config = load_cli_config(args.config)
    adapters_dir = Path(args.adapters_dir) if args.adapters_dir else config.path(config.adapters.dir)
    return adapters_dir, config.adapters.default_weight, config.adapters.lcm_adapter


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    import sys

    from engine.cli import CliError
    from engine.generation.lora_files import scan_directory

    adapters_dir, default_weight, lcm_adapter = _settings(args)
    if not adapters_dir.is_dir():
        raise CliError(f"adapters directory {adapters_dir} does not exist (set [adapters] dir or pass --adapters-dir)")
    entries = scan_directory(adapters_dir, default_weight=default_weight, lcm_adapter=lcm_adapter)
    if args.json:
        listed = [{**e.to_info().model_dump(), "a1111_hash": e.addnet_hash[:12]} for e in entries.values()]
        print(json.dumps(listed, indent=2, ensure_ascii=False))
        return 0
    if not entries:
        print(f"no adapters in {adapters_dir}")
        return 0
    rows = [list(_COLUMNS)]
    for e in entries.values():
        triggers = _shorten(", ".join(e.triggers), _MAX_TRIGGERS_CHARS) or "-"
        rows.append([e.name, e.kind, triggers, f"{e.default_weight:g}", e.format, e.sha256[:10], e.addnet_hash[:12] or "-"])
    print(format_table(rows))
    for e in entries.values():
        if e.problem:
            print(f"warning: adapter {e.name} ({e.path.name}) cannot be used: {e.problem}", file=sys.stderr)
    return 0
