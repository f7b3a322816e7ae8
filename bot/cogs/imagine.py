"""/imagine: the options, their autocomplete, validation, and the start of a job."""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from typing import TYPE_CHECKING, Optional

import discord
import pydantic
from discord import app_commands
from discord.ext import commands

from bot.actions import start_job, store_and_acknowledge
from bot.catalog import AdapterCatalog
from bot.errors import InvalidOption, UserFacingError
from bot.i18n import Problems, _
from bot.policy import (SDXL_PRESETS, aspect_size, channel_is_nsfw, check_access, check_content, check_ranges,
                        content_rules, with_safety_negative)
from bot.picture_jobs import fetch_picture, submit_if_waiting
from bot.uploads import check_declared_size, read_picture, upload_name
from engine.contract import limits, protocol
from engine.contract.config import ArcaeConfig
from engine.contract.errors import InvalidRequest
from engine.contract.prompt_syntax import check_no_lora_tags, extract_lora_tags, parse_prompt_attention
from engine.contract.samplers import FAST_SAMPLER, available_samplers, get_sampler

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)

ASPECT_CHOICES = [app_commands.Choice(name=f"{label} ({w}×{h} on SDXL)", value=label)
                  for label, (w, h) in SDXL_PRESETS.items()]
MAX_CHOICES = 25
# Few-step modes (engine.generation.fast_modes; the bot stays torch-free and does not import it). The engine
# refuses a mode whose adapter is not installed, or that cannot run on the base, saying why.
FAST_CHOICES = [app_commands.Choice(name=name, value=value) for name, value in (
    ("off", "off"), ("on: the best installed", "best"), ("DMD2 (4 steps)", "dmd2"), ("Hyper-SD", "hyper-sd"),
    ("SDXL-Lightning", "lightning"), ("TCD", "tcd"), ("LCM", "lcm"),
)]


def split_names(text: str | None) -> list[str]:
    """'a, b ,c' -> ['a', 'b', 'c'] (empty items dropped, order kept, duplicates removed)."""
    seen: list[str] = []
    for part in (text or "").split(","):
        name = part.strip()
        if name and name not in seen:
            seen.append(name)
    return seen


def split_weighted(text: str | None, option: str) -> list[tuple[str, float | None]]:
    """'hikari:0.8, tairitsu' -> [('hikari', 0.8), ('tairitsu', None)]; a bad weight or a repeat is refused."""
    items: list[tuple[str, float | None]] = []
    for item in split_names(text):
        name, colon, raw = item.partition(":")
        name, raw = name.strip(), raw.strip()
        weight = None
        if colon:
            try:
                weight = float(raw)
            except ValueError:
                raise InvalidOption(_("%(option)s: %(item)s has no valid weight; write NAME or NAME:WEIGHT with a "
                                      "weight from -4 to 4, e.g. `%(example)s:0.8`.",
                                      option=option, item=repr(item), example=name or "name")) from None
            problem = limits.weight_problem(f"{option}: the weight of {name}", weight)
            if problem:
                raise InvalidOption(_("Not started: %(problems)s.", problems=Problems([problem])))
        if any(n == name for n, _ in items):
            raise InvalidOption(_("%(option)s: %(name)s is listed twice; give each adapter once.", option=option, name=name))
        items.append((name, weight))
    return items


def list_autocomplete(current: str, names: list[str]) -> list[app_commands.Choice[str]]:
    """Complete the last item of a comma-separated list, keeping the items before it (and their weights).

    Only ``MAX_CHOICES`` fit in Discord's list, so typing narrows it: every adapter stays reachable by
    name however many are installed. A ``:WEIGHT`` typed after a name is kept.
    """
    head, _, last = current.rpartition(",")
    chosen = split_names(head)
    chosen_names = {c.partition(":")[0].strip() for c in chosen}
    prefix = ", ".join(chosen) + (", " if chosen else "")
    needle, colon, weight = last.strip().partition(":")
    needle = needle.strip().lower()
    suffix = f":{weight.strip()}" if colon else ""
    matches = [n for n in names if n not in chosen_names and needle in n.lower()]
    matches.sort(key=lambda n: (n.lower() != needle, not n.lower().startswith(needle), n.lower()))
    choices = []
    for name in matches[:MAX_CHOICES]:
        value = prefix + name + suffix
        if len(value) <= 100:
            choices.append(app_commands.Choice(name=value, value=value))
    return choices


def resolve_adapters(catalog: AdapterCatalog, config: ArcaeConfig, items: list[tuple[str, float | None]],
                     kind: str, weight: float | None) -> list[protocol.AdapterWeight]:
    """Check names against the known adapters (when known); an item's own weight wins over ``weight``."""
    names = [n for n, _ in items]
    known = catalog.names((kind, "other"))
    if known or catalog.all():
        unknown = [n for n in names if catalog.get(n) is None]
        if unknown:
            shown = ", ".join(known[:15]) or "none installed"
            raise InvalidOption(_("Unknown %(kind)s adapter(s): %(unknown)s. Known %(kind)s adapters: %(known)s "
                                  "(see /adapters).", kind=kind, unknown=", ".join(unknown),
                                  known=shown + (" …" if len(known) > 15 else "")))
    try:
        return [protocol.AdapterWeight(name=n, weight=weight if w is None else w) for n, w in items]
    except pydantic.ValidationError:
        raise InvalidOption(_("Adapter names are letters, digits, '.', '_' and '-' (see /adapters).")) from None


SIZE_TEXT = re.compile(r"\s*(\d{1,5})\s*[x×*]\s*(\d{1,5})\s*", re.IGNORECASE)


def parse_size(text: str, config: ArcaeConfig) -> tuple[int, int]:
    """'832x1216' -> (832, 1216) within the configured limits; else a message saying what is allowed."""
    match = SIZE_TEXT.fullmatch(text)
    if not match:
        raise InvalidOption(_("size must be WIDTHxHEIGHT, e.g. 832x1216 (got %(got)s).", got=repr(text[:40])))
    width, height = int(match.group(1)), int(match.group(2))
    problem = limits.size_problem(config.generation, width, height)
    if problem:
        raise InvalidOption(_("Not started: %(problems)s.", problems=Problems([problem])))
    return width, height


def user_samplers() -> list[str]:
    """A1111 sampler names a user may pick (LCM belongs to fast mode, which chooses it itself)."""
    return [name for name in available_samplers() if name != FAST_SAMPLER]


def check_sampler(name: str) -> str:
    """The canonical A1111 name of ``name``; else a message listing the allowed ones."""
    allowed = user_samplers()
    try:
        canonical = get_sampler(name).name
    except InvalidRequest:
        canonical = ""
    if canonical not in allowed:
        raise InvalidOption(_("sampler %(name)s is not available; choose one of: %(allowed)s.",
                              name=repr(name[:40]), allowed=", ".join(allowed)))
    return canonical


def prompt_lora_names(catalog: AdapterCatalog, prompt: str, negative: str | None) -> list[str]:
    """The adapters a prompt's ``<lora:NAME:W>`` tags name, checked with the engine's parser.

    The tags stay in the prompt (the engine applies them); unknown names and malformed weights
    are refused here, before the job is queued, unknown names with the closest installed ones.
    """
    try:
        text, tags = extract_lora_tags(prompt)
        check_no_lora_tags(negative or "")
        for part in (text, negative or ""):
            parse_prompt_attention(part)
    except InvalidRequest as exc:
        raise InvalidOption(f"Not started: {exc}.") from None
    known = [a.name for a in catalog.all()]
    for tag in tags:
        if known and catalog.get(tag.name) is None:
            close = difflib.get_close_matches(tag.name, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else "see /adapters for the installed ones."
            raise InvalidOption(f"Not started: <lora:{tag.name}> names no installed adapter; {hint}")
    return [t.name for t in tags]


def add_triggers(prompt: str, adapters: list[protocol.AdapterWeight], catalog: AdapterCatalog) -> str:
    """Append the chosen characters' trigger words the prompt does not already contain."""
    lowered = prompt.lower()
    extra = []
    for a in adapters:
        info = catalog.get(a.name)
        for trigger in info.triggers if info else []:
            if trigger.lower() not in lowered and trigger not in extra:
                extra.append(trigger)
    return ", ".join([prompt, *extra]) if extra else prompt


def fast_fields(choice: str | None, saved: bool | None, weight: float | None) -> dict:
    """``fast``/``fast_mode``/``fast_weight`` of a request from the ``fast:`` option and the user's saved setting."""
    if choice is None:
        on, mode = bool(saved), None
    else:
        on, mode = choice != "off", (None if choice in ("off", "best") else choice)
    if weight is not None and not on:
        raise InvalidOption(_("fast_weight applies only in fast mode; choose a fast mode too."))
    return {"fast": on, "fast_mode": mode, "fast_weight": weight}


def chosen_size(aspect: str | None, size: str | None, saved_aspect: str | None,
                config: ArcaeConfig) -> tuple[int | None, int | None]:
    """``size:`` (exact), else ``aspect:``, else the saved aspect, else the engine's default (None, None)."""
    if size and aspect:
        raise InvalidOption(_("Choose either aspect or size, not both."))
    if size:
        return parse_size(size, config)
    if aspect or saved_aspect:
        return aspect_size(aspect or saved_aspect or "", config)
    return None, None


async def start_from_picture(interaction: discord.Interaction, attachment: discord.Attachment,
                             params: protocol.GenerationParams) -> None:
    """img2img from a user's picture: store the job, acknowledge, then fetch and check the picture, then submit.

    The job row (with the attachment's address) is committed before the acknowledgement, as for
    every job, so a bot stopped while downloading fetches the picture again on restart
    (``bot.picture_jobs``). Downloading and checking a large picture can take longer than
    Discord's 3 s, so it comes after the acknowledgement; a refused picture removes the job
    again, deletes the "thinking…" message and answers privately.
    """
    bot: "ArcaeBot" = interaction.client  # type: ignore[assignment]
    config = bot.config
    check_declared_size(attachment, config)  # refused before anything is stored
    job = await store_and_acknowledge(interaction, params=params, kind="variation", source_image=upload_name(),
                                      source_url=attachment.url)
    bot.jobs.fetching.add(job.job_id)
    try:
        await fetch_picture(config, job, lambda: read_picture(attachment, config))
    except UserFacingError:
        await bot.db.forget_job(job.job_id)
        with contextlib.suppress(discord.HTTPException):
            await interaction.delete_original_response()
        raise
    except Exception:
        # The job is stored and acknowledged: it ends with a message on it, never in silence.
        log.exception("job %s: fetching the user's picture failed", job.job_id)
        await bot.jobs.fail(job.job_id, _("❌ Job `%(job_id)s` failed: your picture could not be downloaded. "
                                          "Please try again.", job_id=job.job_id).render(job.locale),
                            error="picture download failed")
        return
    finally:
        bot.jobs.fetching.discard(job.job_id)
    await submit_if_waiting(bot.jobs, job.job_id)


class Imagine(commands.Cog):
    """The /imagine command."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot

    @app_commands.command(name="imagine", description="Generate anime images from a prompt")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="What to draw (danbooru-style tags work best)",
        negative="What to avoid (replaces the default negative prompt)",
        style="Style adapter(s), comma-separated, each with an optional weight: hikari:0.8, tairitsu:0.6",
        style_weight="Weight of the style adapters without their own, -4 to 4 (default: the adapter's own)",
        character="Character adapter(s), comma-separated, each optionally NAME:WEIGHT; trigger words are added",
        character_weight="Weight of the character adapters without their own, -4 to 4",
        fast="Fast mode: a few-step adapter (DMD2, Hyper-SD, Lightning, TCD, LCM); a little less detail",
        fast_weight="Weight of the fast-mode adapter, 0.1 to 1.5 (default: the mode's own)",
        steps="Sampling steps",
        cfg="Prompt adherence (CFG scale); in fast mode within the mode's own range",
        seed="Seed for reproducible results (empty = random)",
        aspect="Aspect ratio",
        count="How many images (1-4)",
        sampler="Sampler, by its AUTOMATIC1111 name (default: the configured one)",
        size="Exact size WIDTHxHEIGHT, multiples of 8 (instead of an aspect ratio)",
        image="Start from your picture (img2img): PNG, JPEG, WebP, GIF or BMP",
        strength="With an image: how far to move from it, 0.05 (close) to 1 (new); default the variation strength",
    )
    @app_commands.choices(aspect=ASPECT_CHOICES, fast=FAST_CHOICES)
    async def imagine(self, interaction: discord.Interaction, prompt: str, negative: Optional[str] = None,
                      style: Optional[str] = None, style_weight: Optional[float] = None,
                      character: Optional[str] = None, character_weight: Optional[float] = None,
                      fast: Optional[str] = None, steps: Optional[int] = None, cfg: Optional[float] = None,
                      seed: Optional[int] = None, aspect: Optional[str] = None, count: int = 1,
                      fast_weight: Optional[app_commands.Range[float, 0.1, 1.5]] = None,
                      sampler: Optional[str] = None, size: Optional[str] = None,
                      image: Optional[discord.Attachment] = None,
                      strength: Optional[app_commands.Range[float, 0.05, 1.0]] = None) -> None:
        config = self.bot.config
        if strength is not None and image is None:
            raise InvalidOption(_("strength applies only to a picture: attach one with the `image` option."))
        settings = await self.bot.db.settings(interaction.user.id)
        check_access(interaction, config)
        check_ranges(config, prompt=prompt, steps=steps, cfg=cfg, count=count, seed=seed, negative=negative,
                     weights={"style_weight": style_weight, "character_weight": character_weight})
        catalog = self.bot.catalog
        styles = resolve_adapters(catalog, config, split_weighted(style or settings.style, "style"), "style",
                                  style_weight)
        characters = resolve_adapters(catalog, config, split_weighted(character, "character"), "character",
                                      character_weight)
        adapters = styles + characters
        tagged = prompt_lora_names(catalog, prompt, negative)
        chosen = {a.name for a in adapters} | set(tagged)
        if len(chosen) > config.adapters.max_active:
            raise InvalidOption(_("At most %(limit)s adapters per image (you chose %(chosen)s).",
                                  limit=config.adapters.max_active, chosen=len(chosen)))
        if config.discord.add_character_triggers:
            prompt = add_triggers(prompt, characters, catalog)
        nsfw = channel_is_nsfw(interaction.channel)
        check_content(prompt, nsfw, config)
        rules = content_rules(nsfw, config)
        width, height = chosen_size(aspect, size, settings.aspect, config)
        try:
            params = protocol.GenerationParams(
                prompt=prompt, negative_prompt=with_safety_negative(negative or settings.negative, rules, config),
                seed=seed, steps=steps, cfg=cfg, width=width, height=height, count=count, adapters=adapters,
                sampler=check_sampler(sampler) if sampler else None, strength=strength if image is not None else None,
                **fast_fields(fast, settings.fast, fast_weight))
        except pydantic.ValidationError as exc:
            raise InvalidOption(f"Not started: {exc.errors()[0].get('msg', 'invalid value')}.") from None
        if image is not None:
            await start_from_picture(interaction, image, params)
            return
        await start_job(interaction, params=params)

    @imagine.autocomplete("style")
    async def style_autocomplete(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        self.bot.catalog.refresh_soon()
        return list_autocomplete(current, self.bot.catalog.names(("style",)))

    @imagine.autocomplete("character")
    async def character_autocomplete(self, interaction: discord.Interaction,
                                     current: str) -> list[app_commands.Choice[str]]:
        self.bot.catalog.refresh_soon()
        return list_autocomplete(current, self.bot.catalog.names(("character",)))

    @imagine.autocomplete("sampler")
    async def sampler_autocomplete(self, interaction: discord.Interaction,
                                   current: str) -> list[app_commands.Choice[str]]:
        needle = current.strip().lower()
        return [app_commands.Choice(name=n, value=n) for n in user_samplers() if needle in n.lower()][:MAX_CHOICES]


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(Imagine(bot))
