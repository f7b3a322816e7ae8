"""Embeds and status lines users see: results, progress, job parameters.

Discord's limits (embed description 4096, field value 1024, 6000 characters in all)
are respected by truncating long text with an ellipsis, never by failing.
"""

from __future__ import annotations

import re

import discord

from bot.db import Job
from bot.i18n import Text, _
from engine.contract import protocol

DESCRIPTION_LIMIT = 4096
FIELD_LIMIT = 1024
CONTENT_LIMIT = 2000
COLOR = discord.Colour(0x7C5CFF)


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending with an ellipsis when cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def adapters_text(adapters: list[protocol.AdapterWeight]) -> str:
    if not adapters:
        return "none"
    return ", ".join(f"{a.name}:{a.weight:g}" if a.weight is not None else a.name for a in adapters)


def _source_text(job: Job, resolved: protocol.ResolvedParams | None) -> str:
    """' of image 3 · strength 0.25' for an img2img job (the bot stores sources as <job>-<index>.png)."""
    if job.kind == "txt2img" or not job.source_image:
        return ""
    match = re.search(r"-(\d+)\.(?:png|jpg)$", job.source_image)
    text = f" of image {int(match.group(1)) + 1}" if match else ""
    strength = resolved.strength if resolved and resolved.strength is not None else job.strength
    return text + (f" · strength {strength:g}" if strength is not None else "")


def _mode(job: Job, resolved: protocol.ResolvedParams | None) -> str:
    mode = (resolved.mode if resolved else job.kind) + _source_text(job, resolved)
    fast = resolved.fast if resolved else job.params.fast
    recipe = (resolved.fast_mode if resolved else job.params.fast_mode) or ("LCM" if resolved else "")
    if resolved is not None and resolved.fast_distilled:  # the mix's own distilled adapter ran
        recipe = f"{recipe}, {resolved.fast_distilled} distilled for this mix"
    return f"{mode}{f' · fast ({recipe})' if recipe else ' · fast'}" if fast else mode


def params_embed(job: Job, *, title: str | None = None, author: str | None = None,
                 language: str | None = None) -> discord.Embed:
    """The full parameters of a job: what ran when it finished, else what was asked (labels in ``language``)."""
    def t(message: Text) -> str:
        return message.render(language)

    r = job.resolved
    p = job.params
    prompt = r.prompt if r else p.prompt
    # Keep the whole embed under 6000 characters: the prompt gets what the other fields leave.
    embed = discord.Embed(title=title or "Arcae", colour=COLOR,
                          description=truncate(prompt, min(DESCRIPTION_LIMIT, 3000)))
    default = t(_("default"))
    negative = r.negative_prompt if r else (p.negative_prompt or t(_("(default)")))
    embed.add_field(name=t(_("Negative")), value=truncate(negative or t(_("(none)")), FIELD_LIMIT), inline=False)
    seed = str(r.seed) if r else (str(p.seed) if p.seed is not None else t(_("random")))
    size = f"{r.width}×{r.height}" if r else (f"{p.width}×{p.height}" if p.width and p.height else default)
    embed.add_field(name=t(_("Seed")), value=seed)
    embed.add_field(name=t(_("Size")), value=size)
    embed.add_field(name=t(_("Steps")), value=str(r.steps if r else (p.steps or default)))
    embed.add_field(name="CFG", value=f"{r.cfg:g}" if r else (f"{p.cfg:g}" if p.cfg is not None else default))
    embed.add_field(name=t(_("Sampler")), value=(r.sampler if r else p.sampler) or default)
    embed.add_field(name=t(_("Mode")), value=_mode(job, r))
    embed.add_field(name=t(_("Adapters")), value=truncate(adapters_text(r.adapters if r else p.adapters), FIELD_LIMIT),
                    inline=False)
    if job.elapsed_s is not None:
        embed.add_field(name=t(_("Time")), value=f"{job.elapsed_s:.1f} s")
    embed.add_field(name=t(_("Job")), value=f"`{job.job_id}`")
    if author:
        embed.set_author(name=truncate(author, 256))
    return embed


def progress_bar(step: int, total: int, width: int = 12) -> str:
    filled = 0 if total <= 0 else min(width, round(width * step / total))
    return "▰" * filled + "▱" * (width - filled)


def status_line(job_id: str, state: str, *, position: int | None = None, step: int | None = None,
                total: int | None = None, note: str = "", language: str | None = None) -> str:
    """The one-line status shown while a job waits or runs (in ``language``, a ``bot.i18n`` catalog)."""
    if state == "queued":
        where = (_("next") if position == 0 else
                 _("position %(n)s", n=position + 1) if position is not None else _("waiting"))
        message = _("⏳ Queued (%(where)s) · `%(job_id)s`", where=where, job_id=job_id)
    elif state == "unavailable":
        message = _("⏳ Queued: the engine is restarting; your job starts when it is back · `%(job_id)s`",
                    job_id=job_id)
    elif state == "restarting":
        message = _("🔄 Engine restarting — your job will resume · `%(job_id)s`", job_id=job_id)
    elif state == "running" and step is not None and total:
        message = _("🎨 Generating… step %(step)s/%(total)s %(bar)s · `%(job_id)s`", step=step, total=total,
                    bar=progress_bar(step, total), job_id=job_id)
    elif state == "running":
        message = _("🎨 Generating… · `%(job_id)s`", job_id=job_id)
    else:
        message = _("%(state)s · `%(job_id)s`", state=state, job_id=job_id)
    text = message.render(language)
    return truncate(text + (f"\n{note}" if note else ""), CONTENT_LIMIT)
