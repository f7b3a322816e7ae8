"""Languages: gettext catalogs (zh-CN, ja) beside English, messages picked by the Discord locale.

The catalogs are ``bot/locale/<lang>/LC_MESSAGES/arcae.po``, kept with Babel (README, "Languages").
They are compiled in memory when first used (Babel ``read_po`` then ``write_mo``), not shipped as
``.mo`` files: a stale compiled file can never shadow an edited ``.po``, and nothing is written next
to an installed package (which may be read-only).

Messages are written as ``_("... %(limit)s ...", limit=3)``: a ``Text`` that renders in English by
``str()`` (what logs and tests see) and in the user's language by ``render(locale)``. Named
placeholders let a translation reorder them. Command names stay ASCII (what users type and what
the README documents); their descriptions, option descriptions and choices are localised through
``ArcaeTranslator``.
"""

from __future__ import annotations

import functools
import gettext
import io
import logging
import re
from pathlib import Path
from typing import Any

import discord
from discord import app_commands

log = logging.getLogger(__name__)

LOCALE_DIR = Path(__file__).parent / "locale"
DOMAIN = "arcae"
# Discord locale -> catalog folder. English is the source language (no catalog).
LANGUAGES = {"zh-CN": "zh_CN", "ja": "ja"}


@functools.cache
def catalog(language: str) -> gettext.NullTranslations:
    """The compiled catalog of ``language`` (a folder name, e.g. "ja"); English (no catalog) when absent."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    path = LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"
    if not path.is_file():
        return gettext.NullTranslations()
    with path.open("rb") as f:
        parsed = read_po(f, locale=language)
    buf = io.BytesIO()
    write_mo(buf, parsed)
    buf.seek(0)
    return gettext.GNUTranslations(buf)


def language_of(locale: object) -> str | None:
    """The catalog for a Discord locale (``discord.Locale`` or its value), None for English and the rest."""
    value = getattr(locale, "value", locale)
    return LANGUAGES.get(str(value)) if value else None


def guild_language(guild: object) -> str | None:
    """The catalog for a server's language (``guild.preferred_locale``): for posts everyone there reads."""
    return language_of(getattr(guild, "preferred_locale", None)) if guild is not None else None


def interaction_language(interaction: discord.Interaction | None) -> str | None:
    """The catalog for the user of ``interaction`` (their Discord client's language)."""
    return language_of(getattr(interaction, "locale", None)) if interaction is not None else None


class Text:
    """A message to translate when its reader is known; ``str()`` is the English text."""

    def __init__(self, msgid: str, /, **params: Any) -> None:
        self.msgid = msgid
        self.plural: str | None = None  # set by ``ngettext``
        self.count = 0
        self.params = params

    def render(self, language: str | None) -> str:
        """The message in ``language`` (a catalog name or a Discord locale), English when there is none."""
        if language in LANGUAGES:
            language = LANGUAGES[language]
        trans = catalog(language) if language else gettext.NullTranslations()
        if self.plural is not None:
            template = trans.ngettext(self.msgid, self.plural, self.count)
        else:
            template = trans.gettext(self.msgid)
        params = {k: (v.render(language) if isinstance(v, Text) else v) for k, v in self.params.items()}
        try:
            return template % params if params else template
        except (KeyError, ValueError, TypeError):
            # A broken translation must not hide the message: fall back to English and say so in the log.
            log.error("translation of %r into %s does not fit its placeholders", self.msgid, language)
            return self.msgid % params if params else self.msgid

    def __str__(self) -> str:
        return self.render(None)

    def __repr__(self) -> str:
        return f"Text({self.msgid!r})"


def _(msgid: str, **params: Any) -> Text:
    """A translatable message with named ``%(name)s`` placeholders (extracted by Babel)."""
    return Text(msgid, **params)


def ngettext(singular: str, plural: str, n: int, **params: Any) -> Text:
    """A translatable message whose wording depends on the number ``n`` (given to it as ``%(n)s``)."""
    text = Text(singular, n=n, **params)
    text.plural, text.count = plural, n
    return text


def localize(message: object, language: str | None) -> str:
    """A ``Text`` in ``language``; any other value as its ``str()``."""
    return message.render(language) if isinstance(message, Text) else str(message)


def tr(interaction: discord.Interaction | None, msgid: str, **params: Any) -> str:
    """``msgid`` in the language of ``interaction``'s user, formatted with ``params``."""
    return Text(msgid, **params).render(interaction_language(interaction))


def N_(msgid: str) -> str:
    """Mark ``msgid`` for extraction only; it is translated where it is used."""
    return msgid


# The English sentences of the engine contract's limit checks (engine/contract/limits.py), which the
# bot shows as they are. The contract stays free of any language, so the bot recognises these shapes
# and translates them; an unknown sentence is shown in English.
ENGINE_SHAPES = (
    N_("%(label)s must be between %(low)s and %(high)s%(hint)s (got %(value)s)"),
    N_("%(label)s must be at most %(limit)s characters (it has %(length)s)"),
    N_("%(label)s must contain visible text (it is empty, or only spaces or invisible characters "
       "such as zero-width spaces)"),
    N_("size %(size)s: width and height must be multiples of 8"),
    N_("size %(size)s: each side must be between %(low)s and %(high)s pixels"),
    N_("size %(size)s: at most %(limit)s pixels (width x height) allowed"),
)
# Parts inside those sentences that are themselves words rather than names or numbers.
ENGINE_WORDS = (N_(" in fast mode"),)


# A hint is one of the known words or nothing; any other part is at least one character.
_PART = {"hint": "(?:" + "|".join(re.escape(w) for w in ENGINE_WORDS) + ")?"}


@functools.cache
def _shape_patterns() -> list[tuple[re.Pattern[str], str]]:
    patterns = []
    for shape in ENGINE_SHAPES:
        pieces = re.split(r"%\((\w+)\)s", shape)
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PART.get(p, '.+?')})"
                        for i, p in enumerate(pieces))
        patterns.append((re.compile(regex + r"\Z", re.S), shape))
    return patterns


def engine_sentence(sentence: str) -> Text | str:
    """A limit sentence from the engine contract as a translatable ``Text`` (itself when not a known shape)."""
    for pattern, shape in _shape_patterns():
        match = pattern.match(sentence)
        if match:
            params: dict[str, Any] = dict(match.groupdict())
            if params.get("hint") in ENGINE_WORDS:
                params["hint"] = Text(params["hint"])
            return Text(shape, **params)
    return sentence


class Problems(Text):
    """Several limit sentences of the engine contract, joined by "; ", each translated when known."""

    def __init__(self, sentences: list[str]) -> None:
        super().__init__("")
        self.sentences = sentences

    def render(self, language: str | None) -> str:
        return "; ".join(localize(engine_sentence(s), language) for s in self.sentences)


class ArcaeTranslator(app_commands.Translator):
    """Descriptions, option descriptions and choice names of the commands, from the catalogs.

    Names are not translated: users, the README and other users' messages name commands in ASCII.
    """

    KEEP = frozenset({app_commands.TranslationContextLocation.command_name,
                      app_commands.TranslationContextLocation.group_name,
                      app_commands.TranslationContextLocation.parameter_name})

    async def translate(self, string: app_commands.locale_str, locale: discord.Locale,
                        context: app_commands.TranslationContext[Any, Any]) -> str | None:
        language = language_of(locale)
        if language is None or context.location in self.KEEP:
            return None
        translated = catalog(language).gettext(string.message)
        return translated if translated != string.message else None
