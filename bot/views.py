"""Buttons that keep working after a restart.

Each button is a ``DynamicItem`` whose custom id carries the action, for per-image actions the
image's number, and the job id (``arcae:<action>[<n>]:<job_id>``, e.g. ``arcae:up2:<job_id>`` is
Midjourney's U2); the bot registers the class once at start
(``add_dynamic_items``), so a press on a week-old message still reaches the handler,
which reads the job from the database. Views are built with ``timeout=None``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import discord

from bot.i18n import N_, Text

log = logging.getLogger(__name__)

ACTIONS: dict[str, tuple[str, discord.ButtonStyle, str]] = {
    # action: (label, style, emoji)
    "reroll": (N_("Reroll"), discord.ButtonStyle.secondary, "🎲"),
    "var": (N_("Vary (Strong)"), discord.ButtonStyle.secondary, "🔀"),
    "vsub": (N_("Vary (Subtle)"), discord.ButtonStyle.secondary, "🌀"),
    "up": (N_("Upscale"), discord.ButtonStyle.secondary, "🔍"),
    "share": (N_("Share to gallery"), discord.ButtonStyle.primary, "🖼️"),
    "del": (N_("Delete"), discord.ButtonStyle.danger, "🗑️"),
    "cancel": (N_("Cancel"), discord.ButtonStyle.danger, "✖️"),
    "remix": (N_("Remix"), discord.ButtonStyle.primary, "🎨"),
    "gdel": (N_("Remove"), discord.ButtonStyle.danger, "🗑️"),
}
# Actions on one image of a batch: the custom id names the image (1-based); none means image 1.
PER_IMAGE = frozenset({"up", "var", "vsub"})
# Short labels for a batch, as Midjourney shows them (U1, V1), with the subtle variation beside them.
SHORT_LABELS = {"up": "U%(n)s", "var": "V%(n)s", "vsub": N_("V%(n)s subtle")}
BUTTONS_PER_ROW = 5
MAX_ROWS = 5


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]],
                template=r"arcae:(?P<action>[a-z]+)(?P<image>[1-8])?:(?P<job_id>[A-Za-z0-9_\-]{1,64})"):
    """One action on one job (and image); the bot routes the press to ``bot.actions`` (``ArcaeBot.run_job_button``)."""

    def __init__(self, action: str, job_id: str, image: int | None = None, *, row: int | None = None,
                 language: str | None = None) -> None:
        label, style, emoji = ACTIONS[action]
        # The label is only shown; the custom id, which routes the press, is the same in every language.
        label = Text(label).render(language)
        if image is not None:
            label = Text(SHORT_LABELS[action], n=image).render(language)
        super().__init__(discord.ui.Button(label=label, style=style, emoji=emoji, row=row,
                                           custom_id=f"arcae:{action}{image or ''}:{job_id}"))
        self.action = action
        self.job_id = job_id
        self.image = image

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: Any) -> "JobButton":
        action = match["action"]
        if action not in ACTIONS:
            raise ValueError(f"unknown button action {action!r}")
        image = int(match["image"]) if match["image"] else None
        if image is not None and action not in PER_IMAGE:
            raise ValueError(f"button action {action!r} takes no image number")
        return cls(action, match["job_id"], image)

    async def callback(self, interaction: discord.Interaction) -> None:
        # The handlers need the bot's services; the bot, which holds them, routes the press
        # (so that this module, imported by the handlers, does not import them back).
        await interaction.client.run_job_button(  # type: ignore[attr-defined]
            interaction, self.action, self.job_id, self.image or 1)


def _view(job_id: str, actions: list[str], language: str | None = None) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(JobButton(action, job_id, language=language))
    return view


def _per_image_rows(actions: list[str], count: int) -> list[list[tuple[str, int]]]:
    """Rows of (action, image) buttons: one group per action, each group in rows of five."""
    rows = []
    for action in actions:
        group = [(action, n) for n in range(1, count + 1)]
        rows += [group[i:i + BUTTONS_PER_ROW] for i in range(0, len(group), BUTTONS_PER_ROW)]
    return rows


def progress_view(job_id: str, *, language: str | None = None) -> discord.ui.View:
    """While a job waits or runs: Cancel."""
    return _view(job_id, ["cancel"], language)


def result_view(job_id: str, *, share: bool, upscale: bool = True, count: int = 1,
                language: str | None = None) -> discord.ui.View:
    """Under every result: Upscale and Vary (Strong / Subtle) per image, Reroll, Share (when manual), Delete.

    One image gets worded buttons; a batch gets Midjourney's U1..Un / V1..Vn rows and a row of
    subtle variations, as long as Discord's five rows of five hold them (the subtle row goes first).
    """
    common = ["reroll"] + (["share"] if share else []) + ["del"]
    if count <= 1:
        return _view(job_id, (["up"] if upscale else []) + ["var", "vsub"] + common, language)
    per_image = (["up"] if upscale else []) + ["var", "vsub"]
    rows = _per_image_rows(per_image, count)
    if len(rows) + 1 > MAX_ROWS:
        rows = _per_image_rows([a for a in per_image if a != "vsub"], count)
    view = discord.ui.View(timeout=None)
    for r, row in enumerate(rows):
        for action, n in row:
            view.add_item(JobButton(action, job_id, n, row=r, language=language))
    for action in common:
        view.add_item(JobButton(action, job_id, row=len(rows), language=language))
    return view


def gallery_view(job_id: str, language: str | None = None) -> discord.ui.View:
    """Under a gallery post: Remix (a modal pre-filled with the parameters) and Remove."""
    return _view(job_id, ["remix", "gdel"], language)


RemixSubmit = Callable[[discord.Interaction, str, dict[str, str]], Awaitable[None]]


class RemixModal(discord.ui.Modal):
    """Pre-filled parameters of a gallery image; submitting calls ``submit`` (which starts a new job)."""

    def __init__(self, job_id: str, *, submit: RemixSubmit, prompt: str, negative: str, seed: str, steps: str,
                 cfg: str) -> None:
        super().__init__(title="Remix", custom_id=f"arcae-remix:{job_id}", timeout=15 * 60)
        self.job_id = job_id
        self.submit = submit
        self.prompt = discord.ui.TextInput(label="Prompt", style=discord.TextStyle.paragraph, default=prompt[:4000],
                                           max_length=4000, custom_id="prompt")
        self.negative = discord.ui.TextInput(label="Negative prompt", style=discord.TextStyle.paragraph,
                                             default=negative[:4000], required=False, max_length=4000,
                                             custom_id="negative")
        self.seed = discord.ui.TextInput(label="Seed (empty = random)", default=seed, required=False,
                                         max_length=12, custom_id="seed")
        self.steps = discord.ui.TextInput(label="Steps", default=steps, required=False, max_length=4,
                                          custom_id="steps")
        self.cfg = discord.ui.TextInput(label="CFG", default=cfg, required=False, max_length=6, custom_id="cfg")
        for item in (self.prompt, self.negative, self.seed, self.steps, self.cfg):
            self.add_item(item)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.submit(interaction, self.job_id, {
            "prompt": self.prompt.value, "negative": self.negative.value, "seed": self.seed.value,
            "steps": self.steps.value, "cfg": self.cfg.value})

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        from bot.replies import report_error

        await report_error(interaction, error, job_id=self.job_id)
