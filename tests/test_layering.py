"""The layering in pyproject.toml ([tool.importlinter]) holds, and breaking it is caught.

Who may import what (the bot only the contract, the scale-out client and training's data side;
a torch-free contract; a library that does not know the service; no product import of tests;
no circles) is written down once, as import-linter contracts, and checked here on every run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, REPO

LINT = ("import sys\n"
        "from importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))\n")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the tree at ``root`` (its own packages first on sys.path)."""
    return subprocess.run([PYTHON, "-c", LINT], cwd=root, capture_output=True, text=True, timeout=240)


def test_import_contracts_are_kept():
    out = lint_imports(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout, out.stdout


def test_a_forbidden_import_breaks_the_contracts(tmp_path):
    # A copy of the tree where the bot imports the generation library (which imports torch).
    for package in ("bot", "engine", "training", "tests"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("fixtures", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    embeds = tmp_path / "bot" / "embeds.py"
    embeds.write_text(embeds.read_text(encoding="utf-8") + "\nfrom engine.generation import generator  # noqa\n",
                      encoding="utf-8")
    out = lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout
    assert "The bot imports only the contract" in out.stdout and "BROKEN" in out.stdout, out.stdout
    assert "bot.embeds -> engine.generation.generator" in out.stdout, out.stdout
