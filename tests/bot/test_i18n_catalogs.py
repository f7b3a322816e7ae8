"""The zh-CN and ja catalogs (issue 14): every message of bot/ is translated in both, with the same
placeholders, the template is current, and the engine contract's limit sentences are recognised."""

from __future__ import annotations

import re

import pytest
from babel.messages.pofile import read_po

from bot.i18n import LANGUAGES, LOCALE_DIR, Text, engine_sentence
from bot.i18n_catalog import TEMPLATE, extract
from engine.contract import limits
from engine.contract.config import parse_config

PLACEHOLDER = re.compile(r"%\((\w+)\)s|\{(\w+)\}")


def placeholders(text: str) -> set[str]:
    return {a or b for a, b in PLACEHOLDER.findall(text)}


def read(language: str):
    with (LOCALE_DIR / language / "LC_MESSAGES" / "arcae.po").open("rb") as f:
        return read_po(f, locale=language)


@pytest.mark.parametrize("language", sorted(LANGUAGES.values()))
def test_every_message_of_the_bot_has_a_translation_with_the_same_placeholders(language):
    catalog = read(language)
    problems = []
    for message in extract():
        if not message.id:
            continue
        ids = message.id if isinstance(message.id, tuple) else (message.id,)
        found = catalog.get(message.id)
        strings = (found.string if isinstance(found.string, tuple) else (found.string,)) if found else ("",)
        if not found or not all(s.strip() for s in strings) or found.fuzzy:
            problems.append(f"untranslated: {ids[0]!r}")
            continue
        for s in strings:
            if placeholders(s) != placeholders(ids[0]):
                problems.append(f"placeholders differ: {ids[0]!r} -> {s!r}")
    assert not problems, "\n".join(problems)


def test_the_template_lists_every_message_of_the_bot():
    """bot/locale/arcae.pot is what ``python -m bot.i18n_catalog`` writes now (run it, then pybabel update)."""
    with TEMPLATE.open("rb") as f:
        template = {m.id for m in read_po(f) if m.id}
    assert template == {m.id for m in extract() if m.id}


def test_every_limit_sentence_of_the_engine_contract_is_recognised():
    gen = parse_config({"generation": {"min_side": 32, "max_side": 256, "max_pixels": 40000}}).generation
    sentences = [limits.steps_problem(gen, 500), limits.steps_problem(gen, 500, fast=True),
                 limits.cfg_problem(gen, 99.0, label="cfg"), limits.count_problem(gen, 99),
                 limits.seed_problem(-1), limits.weight_problem("style_weight", 9.0),
                 limits.too_long(gen, "x" * (gen.max_prompt_chars + 1)), limits.invisible_problem("\u200b", "prompt"),
                 limits.size_problem(gen, 33, 64), limits.size_problem(gen, 16, 64), limits.size_problem(gen, 256, 256)]
    for sentence in sentences:
        assert sentence, "each value above is outside its limit"
        text = engine_sentence(sentence)
        assert isinstance(text, Text), f"not a known shape (add it to bot.i18n.ENGINE_SHAPES): {sentence!r}"
        assert str(text) == sentence, "the English rendering is the contract's own sentence"
        assert text.render("ja") != sentence and text.render("zh_CN") != sentence
