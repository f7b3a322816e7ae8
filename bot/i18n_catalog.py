"""Extract every translatable string of bot/ into bot/locale/arcae.pot (``python -m bot.i18n_catalog``).

Two kinds of strings: messages marked ``_()``, ``ngettext()``, ``N_()`` or a local ``t()`` (Babel's Python extractor),
and the command texts discord.py sends to Discord — ``description=`` of commands and groups,
``app_commands.describe(...)`` option descriptions and ``Choice(name=...)`` labels — which are
plain literals in the cogs, found here with ``ast``. Then ``pybabel update`` merges the template
into each language (README, "Languages").
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import write_po

BOT_DIR = Path(__file__).parent
TEMPLATE = BOT_DIR / "locale" / "arcae.pot"
# ``t`` is the local shorthand some views define for ``_(msgid, **params).render(language)``.
KEYWORDS = {"_": None, "N_": None, "ngettext": (1, 2), "tr": (2,), "t": None}
COMMAND_CALLS = {"command", "Group"}  # calls whose ``description=`` Discord shows


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def command_strings(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of the command descriptions, option descriptions and choice labels in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        for kw in node.keywords:
            literal = isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)
            if not literal:
                continue
            if (name in COMMAND_CALLS and kw.arg == "description") or name == "describe" or \
                    (name == "Choice" and kw.arg == "name"):
                yield kw.value.lineno, kw.value.value
        if name == "Choice" and node.args and isinstance(node.args[0], ast.Constant):
            yield node.args[0].lineno, node.args[0].value
    # Choices built from (label, value) tuples, as /imagine's fast modes are.
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith("_CHOICES") for t in node.targets):
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Tuple) and len(sub.elts) == 2 and \
                        all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in sub.elts):
                    yield sub.elts[0].lineno, sub.elts[0].value


def extract(root: Path = BOT_DIR) -> Catalog:
    """Every translatable string under ``root``, with where it comes from."""
    catalog = Catalog(project="Arcae", domain="arcae")
    for filename, lineno, message, comments, context in extract_from_dir(
            root, method_map=[("**.py", "python")], keywords=KEYWORDS, comment_tags=("TRANSLATORS:",)):
        catalog.add(message, locations=[(f"bot/{filename}", lineno)], auto_comments=comments, context=context)
    for path in sorted(root.rglob("*.py")):
        rel = f"bot/{path.relative_to(root).as_posix()}"
        for lineno, text in command_strings(path.read_text(encoding="utf-8")):
            if text.strip():
                catalog.add(text, locations=[(rel, lineno)])
    return catalog


def main() -> int:
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    catalog = extract()
    with TEMPLATE.open("wb") as f:
        write_po(f, catalog, width=100, omit_header=False)
    print(f"{TEMPLATE}: {len(catalog)} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
