"""Reading AUTOMATIC1111's ``parameters`` text (standard library only, so the bot can use it too).

``engine.generation.infotext`` writes the text and re-exports these; the rules are A1111's
``parse_generation_parameters``: prompt lines, a ``Negative prompt:`` line, then one line of
``Key: value`` pairs whose values may be JSON-quoted.
"""

from __future__ import annotations

import json
import re

INFOTEXT_KEY = "parameters"
REQUEST_KEY = "arcae"

# A1111's infotext_utils: one "Key: value" pair of the parameters line.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def unquote(text: str) -> str:
    """A1111's ``unquote``: undo ``quote`` on a value that is a JSON string."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_infotext(text: str) -> dict[str, str]:
    """Parse an A1111 ``parameters`` text (A1111's ``parse_generation_parameters`` rules).

    Returns ``Prompt``, ``Negative prompt`` and every ``Key: value`` of the last line, quoted
    values unquoted; a ``WxH`` value also gives ``Key-1`` and ``Key-2`` (``Size-1``/``Size-2``)
    as in A1111, and is kept under its own key as well.
    """
    result: dict[str, str] = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result["Prompt"] = prompt
    result["Negative prompt"] = negative_prompt
    for key, value in _RE_PARAM.findall(lastline):
        value = value.strip()
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        size = _RE_IMAGESIZE.fullmatch(value)
        if size is not None:
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)
        result[key] = value
    return result


def parse_lora_hashes(value: str) -> dict[str, str]:
    """``"a: 0123456789ab, b: ..."`` (the unquoted ``Lora hashes`` value) as a dict."""
    hashes: dict[str, str] = {}
    for part in value.split(","):
        name, sep, digest = part.strip().rpartition(":")
        if sep:
            hashes[name.strip()] = digest.strip()
    return hashes
