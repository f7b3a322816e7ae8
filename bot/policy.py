"""Who may do what: the admin gate, generation limits, channel content rules, option checks.

Everything here is pure or reads the database; nothing talks to Discord, so the rules can
be checked (and tested) without a gateway. Every refusal is a ``Refused``/``InvalidOption``
whose message tells the user why and what is allowed.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from dataclasses import dataclass

import discord

from bot.db import Database, Image, Job
from bot.errors import InvalidOption, NotAllowed, Refused
from bot.i18n import Problems, Text, _
from engine.contract import limits
from engine.contract.config import ArcaeConfig
from engine.contract.sizes import SIZES_BY_ASPECT

SDXL_PRESETS = SIZES_BY_ASPECT  # the engine's size presets, by the aspect label /imagine offers


def aspect_size(aspect: str, config: ArcaeConfig) -> tuple[int, int]:
    """The size for an aspect label: SDXL's preset at full size, else scaled to the default size's area."""
    if aspect not in SDXL_PRESETS:
        raise InvalidOption(_("aspect must be one of %(allowed)s", allowed=", ".join(SDXL_PRESETS)))
    w, h = SDXL_PRESETS[aspect]
    dw, dh = config.generation.size
    if dw * dh >= 768 * 768:
        return w, h
    # Small configured models (tests, previews): same ratio, the default area, multiples of 8.
    scale = math.sqrt(dw * dh / (w * h))
    return max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8)


def is_home(guild_id: int | None, config: ArcaeConfig) -> bool:
    """One of Arcae's home servers (the only ones with admin commands)."""
    return guild_id is not None and guild_id in config.discord.home_guilds


def is_admin(user: discord.abc.User, guild: discord.Guild | None, config: ArcaeConfig) -> bool:
    """An Arcae admin here: in a home server only, a configured admin user or role, or that server's owner.

    The owner of any other server the bot was invited to is not an admin: adapters, training and
    the queue are shared by every server, so only the operator's servers may change them.
    """
    if guild is None or not is_home(guild.id, config):
        return False
    if user.id in config.discord.admin_user_ids or guild.owner_id == user.id:
        return True
    roles = getattr(user, "roles", None) or []
    return any(role.id in config.discord.admin_role_ids for role in roles)


def require_admin(interaction: discord.Interaction, config: ArcaeConfig) -> None:
    """Raise ``NotAllowed`` unless the interaction's user is an Arcae admin of this (home) server."""
    if not is_home(interaction.guild_id, config):
        raise NotAllowed(_("Admin commands work only in Arcae's home servers (chosen by the bot's operator), "
                           "and this server is not one of them."))
    if not is_admin(interaction.user, interaction.guild, config):
        raise NotAllowed(_("This command is for Arcae admins only (configured admin roles or users, "
                           "or the owner of this home server)."))


def channel_is_nsfw(channel: object) -> bool:
    """Age-restricted channel (threads inherit from their parent)."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def check_access(interaction: discord.Interaction, config: ArcaeConfig) -> None:
    """Allowed channels and roles for generating (admins exempt)."""
    if is_admin(interaction.user, interaction.guild, config):
        return
    allowed_channels = config.discord.allowed_channel_ids
    channel_id = interaction.channel_id or 0
    parent_id = getattr(interaction.channel, "parent_id", None)
    if allowed_channels and channel_id not in allowed_channels and parent_id not in allowed_channels:
        where = ", ".join(f"<#{c}>" for c in allowed_channels)
        raise Refused(_("Image generation is not enabled in this channel. Try %(channels)s.", channels=where))
    allowed_roles = config.discord.allowed_role_ids
    if allowed_roles:
        roles = {r.id for r in getattr(interaction.user, "roles", [])}
        if not roles.intersection(allowed_roles):
            names = ", ".join(f"<@&{r}>" for r in allowed_roles)
            raise Refused(_("You need one of these roles to generate images: %(roles)s.", roles=names))


async def check_limits(db: Database, user_id: int, admin: bool, config: ArcaeConfig) -> None:
    """Per-user queue and cooldown, global queue. Admins are exempt."""
    if admin:
        return
    limits = config.limits
    mine = await db.count_active(user_id)
    if mine >= limits.max_queued_per_user:
        raise Refused(_("You already have %(mine)s job(s) waiting or running; the limit is %(limit)s. "
                        "Wait for one to finish (see /queue) or /cancel one.",
                        mine=mine, limit=limits.max_queued_per_user))
    last = await db.last_job_time(user_id)
    if last is not None and limits.cooldown_s > 0:
        wait = last + limits.cooldown_s - time.time()
        if wait > 0:
            raise Refused(_("Cooldown: you can start a new job in %(wait)s s (one every %(every)s s).",
                            wait=math.ceil(wait), every=format(limits.cooldown_s, "g")))
    total = await db.count_active()
    if total >= limits.global_max_queued:
        raise Refused(_("The queue is full (%(total)s jobs, limit %(limit)s). Please try again in a few minutes.",
                        total=total, limit=limits.global_max_queued))


# Characters that render as nothing: format (zero-width space/joiners, word joiner, BOM, tags),
# controls, separators, lone combining marks, and letters Unicode draws as blank (Hangul fillers,
# the blank Braille pattern), which hostile users paste to make "empty" text.
def _normalized(text: str) -> str:
    # Full-width letters and the like fold to ASCII, and zero-width characters vanish, so that
    # "ｎｕｄｅ" or "nu\u200bde" cannot slip past a blocked tag.
    folded = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in folded if unicodedata.category(ch) != "Cf").lower()


def _tag_pattern(tag: str) -> re.Pattern[str]:
    return re.compile(r"(?<![a-z0-9])" + re.escape(tag.lower()).replace(r"\ ", r"[\s_]+") + r"(?![a-z0-9])")


def blocked_tags_in(prompt: str, config: ArcaeConfig) -> list[str]:
    """Configured blocked tags the prompt contains (whole words, '_' same as space, invisible characters ignored)."""
    text = _normalized(prompt)
    return [t for t in config.content.blocked_tags if _tag_pattern(t).search(text)]


@dataclass(frozen=True)
class ContentRules:
    """What applies to one request's channel."""

    sfw: bool
    safety_negative: str
    flagged: tuple[str, ...]
    action: str
    unrated: str = "withhold"  # for images without a rating (rater off or not loaded)

    def _action_for(self, rating: str | None) -> str:
        if not self.sfw:
            return "show"
        if rating is None:
            return self.unrated
        return self.action if rating in self.flagged else "show"

    def withheld(self, rating: str | None) -> bool:
        return self._action_for(rating) == "withhold"

    def spoilered(self, rating: str | None) -> bool:
        return self._action_for(rating) == "spoiler"


def content_rules(nsfw_channel: bool, config: ArcaeConfig) -> ContentRules:
    c = config.content
    return ContentRules(sfw=not nsfw_channel, safety_negative=c.safety_negative if not nsfw_channel else "",
                        flagged=tuple(c.flagged_ratings), action=c.sfw_action, unrated=c.unrated_action)


def rating_status(rates_outputs: bool | None, config: ArcaeConfig) -> str:
    """What /status and the start-up warning say about output rating."""
    if rates_outputs:
        return "on (WD tagger)"
    action = config.content.unrated_action
    effect = {"withhold": "withheld", "spoiler": "spoilered", "show": "shown"}[action]
    state = "OFF: images are unrated" if rates_outputs is False else "unknown (the engine did not say)"
    return (f"{state}; unrated images in channels and galleries that are not age-restricted are {effect} "
            f"([content] unrated_action = \"{action}\")")


def gallery_refusal(job: Job, images: list[Image], gallery_nsfw: bool, config: ArcaeConfig) -> Text | None:
    """Why a job may not be posted to the gallery channel (told to the one who shares it), or None when it may."""
    if gallery_nsfw:
        return None
    if job.nsfw_channel:
        return _("This image was made in an age-restricted channel, and the gallery channel is not age-restricted, "
                 "so it cannot be shared there.")
    prompts = [job.params.prompt] + ([job.resolved.prompt] if job.resolved else [])
    found = sorted({t for p in prompts for t in blocked_tags_in(p, config)})
    if found:
        return _("The prompt has tags that are not allowed in the gallery channel (it is not age-restricted): "
                 "%(tags)s.", tags=", ".join(found))
    rules = content_rules(False, config)
    if images and all(rules.withheld(i.rating) for i in images):
        ratings = ", ".join(sorted({i.rating or "not rated" for i in images}))
        return _("The gallery channel is not age-restricted, and its content rules withhold this image "
                 "(%(ratings)s).", ratings=ratings)
    return None


def check_content(prompt: str, nsfw_channel: bool, config: ArcaeConfig) -> None:
    """In a channel that is not age-restricted, refuse prompts with blocked tags."""
    if nsfw_channel:
        return
    found = blocked_tags_in(prompt, config)
    if found:
        raise Refused(_("This channel is not age-restricted, so these tags are not allowed here: %(tags)s. "
                        "Remove them, or use an age-restricted channel.", tags=", ".join(found)))


def with_safety_negative(negative: str | None, rules: ContentRules, config: ArcaeConfig) -> str | None:
    """Append the configured safety negative prompt in SFW channels (to the default negative if none given).

    Refused when the result would exceed ``max_prompt_chars``: the engine would only fail the job later.
    """
    if not rules.safety_negative:
        return negative
    base = config.generation.negative_prompt if negative is None else negative
    combined = f"{base}, {rules.safety_negative}" if base.strip() else rules.safety_negative
    limit = config.generation.max_prompt_chars
    if len(combined) > limit and negative is None:
        raise InvalidOption(_("Not started: the configured default negative prompt plus the safety negative are "
                              "longer than [generation] max_prompt_chars (%(limit)s); please tell an admin.",
                              limit=limit))
    if len(combined) > limit:
        room = max(0, limit - len(rules.safety_negative) - 2)
        raise InvalidOption(_("Not started: in a channel that is not age-restricted the negative prompt must be at "
                              "most %(room)s characters (it has %(length)s), because the safety negative "
                              "is added to it.", room=room, length=len(base)))
    return combined


def check_ranges(config: ArcaeConfig, *, prompt: str, steps: int | None, cfg: float | None, count: int,
                 seed: int | None, weights: dict[str, float | None], negative: str | None = None) -> None:
    """Options outside the configured limits get a message saying what is allowed."""
    g = config.generation
    checks = [
        limits.prompt_problem(g, prompt),
        # An explicit negative must say something: only-invisible text is a mistake or a trick.
        *((limits.invisible_problem(negative, "negative"), limits.too_long(g, negative, "negative"))
          if negative is not None else ()),
        limits.steps_problem(g, steps) if steps is not None else None,
        limits.cfg_problem(g, cfg, label="cfg") if cfg is not None else None,  # the option's name on Discord
        limits.count_problem(g, count),
        limits.seed_problem(seed) if seed is not None else None,
        *(limits.weight_problem(name, w) for name, w in weights.items() if w is not None),
    ]
    problems = [p for p in checks if p]
    if problems:
        # The problems are the engine contract's English sentences; bot.i18n translates their known shapes.
        raise InvalidOption(_("Not started: %(problems)s.", problems=Problems(problems)))
