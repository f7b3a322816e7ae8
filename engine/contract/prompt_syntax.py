"""A1111 prompt syntax above the weighting: ``<lora:NAME:WEIGHT>`` tags and prompt schedules.

Torch-free, so the bot checks a prompt with exactly the parser the engine runs. The order is
A1111's: LoRA tags leave the text first (its extra-networks parser), then prompt editing and
alternation pick the text of each sampling step (``get_learned_conditioning_prompt_schedules``),
and each such text is weighted and chunked by ``engine.generation.prompts``.

- ``<lora:NAME>`` / ``<lora:NAME:W>`` (``<lyco:...>`` too): the adapter at weight W (default 1).
  A third number (A1111's separate UNet weight) must equal W: Arcae has one weight per adapter.
- ``[from:to:when]``, ``[to:when]``, ``[from::when]``: ``when`` with a ``.`` is a fraction of
  the steps (``0.5``), without one a step number (``10``), as A1111 does by default.
- ``[a|b|c]``: a, b, c, a, ... one per step. Schedules nest, also inside weights: ``([a:b:5]:1.2)``.
- A prompt the schedule grammar cannot read keeps its text for every step, as in A1111.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

from engine.contract.errors import InvalidRequest

# A1111's extra_networks.re_extra_net: every <type:args> tag leaves the prompt.
_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_TYPES = ("lora", "lyco")
_NUMBER = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*$")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:NAME:WEIGHT>`` of a prompt."""

    name: str
    weight: float


def _tag_weight(tag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequest(f"{tag}: the weight {text.strip()!r} is not a number; write <lora:NAME:0.8>") from None


def _lora_tag(tag: str, args: list[str]) -> LoraTag:
    name = args[0].strip()
    if not name:
        raise InvalidRequest(f"{tag}: the LoRA name is empty; write <lora:NAME:0.8>")
    positional = [a for a in args[1:] if "=" not in a]
    named = [a for a in args[1:] if "=" in a]
    weight = _tag_weight(tag, positional[0]) if positional else 1.0
    others = [_tag_weight(tag, a) for a in positional[1:2]]
    for item in named:
        key, _, value = item.partition("=")
        if key.strip() not in ("te", "unet"):
            raise InvalidRequest(f"{tag}: {key.strip()}= is not supported; write <lora:NAME:WEIGHT>")
        others.append(_tag_weight(tag, value))
    if len(positional) > 3 or any(w != weight for w in others):
        raise InvalidRequest(
            f"{tag}: separate text-encoder and UNet weights are not supported; give one weight, <lora:{name}:{weight:g}>"
        )
    return LoraTag(name, weight)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<type:...>`` tags (ends stripped) and the LoRAs they name, in order.

    Raises ``InvalidRequest`` for a tag of another type (hypernetworks, embeddings as tags), a
    malformed weight, or the same LoRA named twice.
    """
    tags: list[LoraTag] = []
    for match in _RE_EXTRA_NETWORK.finditer(prompt):
        kind, tag = match.group(1), match.group(0)
        if kind not in _LORA_TYPES:
            raise InvalidRequest(f"{tag}: only <lora:NAME:WEIGHT> tags are supported in prompts")
        item = _lora_tag(tag, match.group(2).split(":"))
        if any(t.name == item.name for t in tags):
            raise InvalidRequest(f"LoRA {item.name!r} is tagged more than once in the prompt; tag each LoRA once")
        tags.append(item)
    return _RE_EXTRA_NETWORK.sub("", prompt).strip(), tags


def check_no_lora_tags(negative: str) -> None:
    """A1111 applies LoRA tags from the positive prompt only: refuse them in the negative."""
    match = _RE_EXTRA_NETWORK.search(negative)
    if match:
        raise InvalidRequest(f"{match.group(0)} in the negative prompt: put LoRA tags in the prompt")


# ------------------------------------------------------------------ prompt schedules

# A parsed prompt: text, or a node that picks its text per step.
Node = Union[str, "Scheduled", "Alternate", "Group"]


@dataclass
class Group:
    """A sequence of nodes, printed one after the other (``(`` ``)`` brackets kept as text)."""

    parts: list[Node]


@dataclass
class Scheduled:
    """``[before:after:when]``: before up to step ``when``, then after."""

    before: Group
    after: Group
    when: str
    step: int = 0


@dataclass
class Alternate:
    """``[a|b|c]``: option ``(step - 1) % n`` at each step."""

    options: list[Group]


class _NoSchedule(Exception):
    """The schedule grammar does not read this prompt: it is used as written."""


class _Parser:
    """Recursive descent over A1111's schedule grammar (``prompt_parser.schedule_parser``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> Group:
        parts: list[Node] = []
        while self.pos < len(self.text):
            start = self.pos
            group = self.prompt(stop="")
            parts.extend(group.parts)
            if self.pos == start:  # a stray ] ) : at the top level is text, as in A1111's start rule
                ch = self.peek()
                if ch == "|":
                    raise _NoSchedule
                parts.append(ch)
                self.pos += 1
        return Group(parts)

    def prompt(self, stop: str) -> Group:
        """Nodes up to (not including) a character of ``stop`` or a closing bracket."""
        parts: list[Node] = []
        while self.pos < len(self.text):
            ch = self.peek()
            if ch == "\\" and self.pos + 1 < len(self.text):
                parts.append(self.text[self.pos : self.pos + 2])
                self.pos += 2
            elif ch in "([":
                parts.extend(self.bracket())
            elif ch in stop or ch in ")]:|":
                break
            else:
                parts.append(ch)
                self.pos += 1
        return Group(parts)

    def bracket(self) -> list[Node]:
        """A bracketed group; at the top level one that does not parse is literal text."""
        start = self.pos
        self.depth += 1
        try:
            return self.round() if self.peek() == "(" else [self.square()]
        except _NoSchedule:
            if self.depth > 1:
                raise
            self.pos = start + 1  # like A1111's start rule, which allows stray brackets
            return [self.text[start]]
        finally:
            self.depth -= 1

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise _NoSchedule
        self.pos += 1

    def round(self) -> list[Node]:
        self.expect("(")
        inner = self.prompt(stop=":)")
        if self.peek() == ":":
            self.pos += 1
            weight = self.prompt(stop=")")
            self.expect(")")
            return ["(", inner, ":", weight, ")"]
        self.expect(")")
        return ["(", inner, ")"]

    def square(self) -> Node:
        self.expect("[")
        first = self.prompt(stop="]:|")
        ch = self.peek()
        if ch == "]":
            self.pos += 1
            return Group(["[", first, "]"])
        if ch == "|":
            options = [first]
            while self.peek() == "|":
                self.pos += 1
                options.append(self.prompt(stop="]|"))
            self.expect("]")
            return Alternate(options)
        self.expect(":")
        second = self.prompt(stop="]:")
        if self.peek() == "]":  # [to:when]
            self.pos += 1
            return Scheduled(Group([]), first, _when(second))
        self.expect(":")
        third = self.prompt(stop="]")
        self.expect("]")
        return Scheduled(first, second, _when(third))


def _flat_text(group: Group) -> str:
    return "".join(p if isinstance(p, str) else _flat_text(p) for p in group.parts)  # type: ignore[arg-type]


def _when(group: Group) -> str:
    text = _flat_text(group) if all(isinstance(p, str) for p in group.parts) else ""
    if not _NUMBER.match(text):
        raise _NoSchedule
    return text.strip()


def _children(node: Node) -> list[Node]:
    if isinstance(node, Scheduled):
        return [node.before, node.after]
    if isinstance(node, Alternate):
        return list(node.options)
    return list(node.parts) if isinstance(node, Group) else []


def _collect_steps(node: Node, steps: int, out: set[int]) -> None:
    """A1111's collect_steps: the steps where the text may change; resolves each ``when``."""
    if isinstance(node, Scheduled):
        value = float(node.when)
        # A1111's default ("new") scheduling: "0.5" is a fraction of the steps, "10" a step.
        node.step = min(steps, int(value * steps if "." in node.when else value))
        if node.step >= 1:
            out.add(node.step)
    elif isinstance(node, Alternate):
        out.update(range(1, steps + 1))
    for child in _children(node):
        _collect_steps(child, steps, out)


def _variable_nodes(node: Node, switches: list[int], cycles: list[int]) -> None:
    """The resolved step of every ``[a:b:when]`` and the option count of every ``[a|b]`` (all depths)."""
    if isinstance(node, Scheduled):
        switches.append(node.step)
    elif isinstance(node, Alternate):
        cycles.append(len(node.options))
    for child in _children(node):
        _variable_nodes(child, switches, cycles)


def _text_at(node: Node, step: int) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, Scheduled):
        return _text_at(node.before if step <= node.step else node.after, step)
    if isinstance(node, Alternate):
        return _text_at(node.options[(step - 1) % len(node.options)], step)
    return "".join(_text_at(p, step) for p in node.parts)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]``: the text used up to each end step (1-based), as A1111 makes it.

    >>> prompt_schedule("a [cat:dog:0.5]", 10)
    [(5, 'a cat'), (10, 'a dog')]
    """
    if "[" not in prompt:
        return [(steps, prompt)]  # only [a:b:when] and [a|b] schedule; without "[" the text is as written
    return _full_schedule(prompt, steps)


def _full_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """``prompt_schedule`` by the grammar (the tests check its shortcut against this)."""
    try:
        tree = _Parser(prompt).parse()
    except _NoSchedule:
        return [(steps, prompt)]
    ends: set[int] = {steps}
    _collect_steps(tree, steps, ends)
    switches: list[int] = []
    cycles: list[int] = []
    _variable_nodes(tree, switches, cycles)
    # The text at a step depends only on which side of each [a:b:when] the step is and which option
    # of each [a|b] it takes: built once per such state, not once per step ([a|b] changes every step).
    texts: dict[tuple[tuple[bool, ...], tuple[int, ...]], str] = {}
    schedule: list[tuple[int, str]] = []
    for end in sorted(ends):
        state = (tuple(end <= s for s in switches), tuple((end - 1) % n for n in cycles))
        text = texts.get(state)
        if text is None:
            text = texts[state] = _text_at(tree, end)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)  # same text: one longer entry, nothing to re-encode
        else:
            schedule.append((end, text))
    return schedule


def text_at_step(schedule: list[tuple[int, str]], step_index: int) -> str:
    """The text for the 0-based sampling step ``step_index`` (A1111's reconstruct_cond_batch rule)."""
    for end, text in schedule:
        if step_index <= end:
            return text
    return schedule[-1][1]


# ---- Attention weights: (x), [x], (x:1.2), escapes, BREAK (A1111's parse_prompt_attention rules)

BREAK_WEIGHT = -1.0  # marks a BREAK fragment in parse_prompt_attention's output

_ROUND = 1.1
_SQUARE = 1 / 1.1
_RE_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes, then a lone backslash (dropped, as A1111 does)
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|      # (text:1.2)
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` pairs; ``("BREAK", BREAK_WEIGHT)`` marks a break.

    >>> parse_prompt_attention("a (b:1.5) [c]")
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 0.9090909090909091)]
    """
    res: list[list[Any]] = []  # [fragment, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            if not item[2]:
                item[1] *= factor

    for match in _RE_ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            if not _is_float(weight):
                # A1111 raises here; silently keeping the "(" open would weight the rest by 1.1.
                raise InvalidRequest(
                    f"weight {weight!r} in {match.group(0).strip()!r} is not a number: write (text:1.2), "
                    "or escape literal brackets as \\( and \\)"
                )
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), _SQUARE)
        elif round_open or square_open:
            res.append([token, 1.0, False])  # inside brackets BREAK is the literal word
        else:
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", BREAK_WEIGHT, True])
                res.append([part, 1.0, False])
    for start in round_open:  # unclosed brackets reach to the end, as in A1111
        multiply_from(start, _ROUND)
    for start in square_open:
        multiply_from(start, _SQUARE)

    merged: list[list[Any]] = []
    for item in res:
        if merged and not item[2] and not merged[-1][2] and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    # Empty fragments carry no tokens; dropped after merging, so fragments (and therefore
    # tokens) stay exactly as A1111 makes them.
    return [(t, w) for t, w, brk in merged if t or brk] or [("", 1.0)]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
