"""What /train shows, built from files on disk: caption pages, run status, checkpoint tables.

Plain functions that read (or, for caption edits, write) a dataset or run folder; the cog calls
them in a worker thread because they read images and JSON from disk. User mistakes raise
``InvalidOption`` with a message that says what is allowed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import discord

from bot import embeds
from bot.errors import InvalidOption
from bot.i18n import N_, Text, _
from bot.training_store import RunRow

MAX_CAPTION_BYTES = 64 * 1024
PROGRESS_CELLS = 20
# A run's status as shown (training_runs.status); the words are translated where they are shown.
STATUS_WORDS = (N_("pending"), N_("running"), N_("completed"), N_("failed"), N_("canceled"))
KIND_WORDS = (N_("character"), N_("style"), N_("lcm"), N_("other"))  # an adapter's kind, likewise


def _file(path: Path, name: str | None = None) -> discord.File:
    return discord.File(io.BytesIO(path.read_bytes()), filename=name or path.name)


# ---------------------------------------------------------------------- captions

def _caption(folder: Path, entry: dict[str, Any]) -> str:
    path = folder / entry.get("caption_file", Path(entry["file"]).with_suffix(".txt").name)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return entry.get("caption", "")


def caption_page(folder: Path, manifest: dict[str, Any], image: str | None, language: str | None = None
                 ) -> tuple[str, list[discord.File]]:
    """One image's tags and scores (with the image), or every caption plus the tag chart."""
    images = manifest.get("images", [])
    if image:
        entry = next((e for e in images if image in (e["file"], Path(e["file"]).stem)), None)
        if entry is None:
            names = ", ".join(e["file"] for e in images[:20])
            raise InvalidOption(_("No image `%(image)s` in dataset `%(dataset)s`. Images: %(names)s.", image=image,
                                  dataset=manifest.get("name"), names=names))
        tags = entry.get("tags", {})
        scored = [f"{t} {s:.2f}" for t, s in {**tags.get("character", {}), **tags.get("general", {})}.items()]
        text = _("**%(file)s** (%(width)sx%(height)s, rating %(rating)s)\nCaption: `%(caption)s`\nTagger: %(tags)s",
                 file=entry["file"], width=entry.get("width"), height=entry.get("height"), rating=entry.get("rating"),
                 caption=_caption(folder, entry), tags=", ".join(scored) or _("no tags above threshold"))
        return text.render(language), [_file(folder / entry["file"])]
    signature = ", ".join(manifest.get("signature_tags", [])[:12]) or _("none")
    header = _("Dataset `%(dataset)s`: %(n)s image(s), %(kind)s, trigger `%(trigger)s`. Signature tags: "
               "%(signature)s.\nEdit: upload NAME.txt files with /train captions (file1..file5).\n",
               dataset=manifest.get("name"), n=len(images), kind=_(str(manifest.get("kind"))),
               trigger=manifest.get("trigger"), signature=signature).render(language)
    lines = [f"`{e['file']}`: {_caption(folder, e)}" for e in images]
    files = []
    chart = folder / manifest.get("chart", "tag_frequency.png")
    if chart.is_file():
        files.append(_file(chart))
    body = "\n".join(lines)
    if len(header) + len(body) > 1900:
        files.append(discord.File(io.BytesIO(body.encode("utf-8")), filename="captions.txt"))
        body = embeds.truncate(body, 1900 - len(header)) + "\n" + _("(all captions in captions.txt)").render(language)
    return header + body, files


def write_captions(folder: Path, manifest: dict[str, Any], uploads: list[tuple[str, bytes]]
                   ) -> tuple[list[str], list[tuple[str, Text]]]:
    """Replace captions from uploaded ``NAME.txt`` files; return (updated images, refused files)."""
    from training.data.run_record import write_atomic, write_json_atomic

    by_stem = {Path(e["file"]).stem: e for e in manifest.get("images", [])}
    updated: list[str] = []
    refused: list[tuple[str, Text]] = []
    for name, data in uploads:
        stem, suffix = Path(name).stem, Path(name).suffix.lower()
        entry = by_stem.get(stem)
        if suffix != ".txt":
            refused.append((name, _("not a .txt caption file")))
        elif entry is None:
            refused.append((name, _("no image %(stem)s.png in the dataset", stem=stem)))
        elif len(data) > MAX_CAPTION_BYTES:
            refused.append((name, _("over %(limit)s KiB", limit=MAX_CAPTION_BYTES // 1024)))
        else:
            try:
                text = data.decode("utf-8-sig").strip()
            except UnicodeDecodeError:
                refused.append((name, _("not UTF-8 text")))
                continue
            if not text:
                refused.append((name, _("empty: a caption needs at least the trigger word")))
                continue
            caption_path = folder / entry.get("caption_file", f"{stem}.txt")
            write_atomic(caption_path, lambda tmp, text=text: tmp.write_text(text + "\n", encoding="utf-8"))
            entry["caption"], entry["caption_source"] = text, "edited"
            updated.append(entry["file"])
    if updated:
        write_json_atomic(folder / "manifest.json", manifest)
    return updated, refused


# ---------------------------------------------------------------------- runs

def _bar(step: int, total: int) -> str:
    filled = round(PROGRESS_CELLS * step / total) if total else 0
    return "█" * filled + "░" * (PROGRESS_CELLS - filled)


def latest_grid(run_dir: Path) -> tuple[int, Path] | None:
    from training.data.run_record import list_checkpoints

    for step, folder in reversed(list_checkpoints(run_dir)):
        if (folder / "grid.png").is_file():
            return step, folder / "grid.png"
    return None


def status_embed(run: RunRow, run_dir: Path, eta: str, language: str | None = None
                 ) -> tuple[discord.Embed, list[discord.File]]:
    """The run's progress, ETA, loss, checkpoints; the loss plot and latest sample grid attached."""
    from training.data.run_record import list_checkpoints

    def t(msgid: str, **params: Any) -> str:
        return _(msgid, **params).render(language)

    embed = discord.Embed(title=t("Training run %(run_id)s", run_id=run.run_id), colour=embeds.COLOR)
    embed.add_field(name=t("Adapter"), value=t("**%(name)s** (%(kind)s) · trigger `%(trigger)s`",
                                               name=run.adapter_name, kind=_(run.kind), trigger=run.trigger),
                    inline=False)
    embed.add_field(name=t("Status"), value=t(run.status))
    total = run.progress_total or int(run.options.get("steps") or 0)
    percent = f" ({100 * run.progress_step // total}%)" if total else ""
    embed.add_field(name=t("Progress"), value=t("step %(step)s/%(total)s", step=run.progress_step, total=total)
                    + f"{percent}\n`{_bar(run.progress_step, total)}`")
    embed.add_field(name=t("Loss"), value=f"{run.loss:.4f}" if run.loss is not None else "—")
    embed.add_field(name=t("ETA"), value=eta)
    steps = [s for s, _unused in list_checkpoints(run_dir)]
    shown = ", ".join(map(str, steps))
    if len(steps) > 40:  # a long run: the first and the newest ones
        shown = f"{len(steps)}: {steps[0]} … {', '.join(map(str, steps[-10:]))}"
    embed.add_field(name=t("Checkpoints"), value=embeds.truncate(shown or t("none yet"), 1024), inline=False)
    if run.recommended_step is not None:
        embed.add_field(name=t("Recommended"), value=t("step %(step)s", step=run.recommended_step))
    if run.error:
        embed.add_field(name=t("Error"), value=embeds.truncate(run.error, 1024), inline=False)
    files = []
    loss_plot = run_dir / "loss.png"
    if loss_plot.is_file():
        files.append(_file(loss_plot, "loss.png"))
    grid = latest_grid(run_dir)
    if grid is not None:
        files.append(_file(grid[1], f"samples-step-{grid[0]}.png"))
        embed.set_image(url=f"attachment://samples-step-{grid[0]}.png")
    embed.set_footer(text=t("dataset %(dataset)s · options %(options)s", dataset=run.dataset,
                            options=embeds.truncate(json.dumps(_shown(run.options)), 900)))
    return embed, files


def _shown(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in ("dataset", "kind", "trigger")}


def choose_step(run_dir: Path, step: int) -> None:
    from training.data.checkpoints import choose_checkpoint
    from engine.contract.training_errors import TrainingError

    try:
        choose_checkpoint(run_dir, step)
    except TrainingError as exc:
        raise InvalidOption(exc.message) from None


def checkpoint_page(run: RunRow, run_dir: Path, record: dict[str, Any], max_grids: int,
                    language: str | None = None) -> tuple[str, list[discord.File]]:
    """The score table (recommended *, chosen >) and the sample grids, best ones first."""
    from training.data.checkpoints import CheckpointScore, format_table
    from training.data.run_record import list_checkpoints

    def t(msgid: str, **params: Any) -> str:
        return _(msgid, **params).render(language)

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return t("Training run `%(run_id)s` (%(status)s) has no checkpoints yet.", run_id=run.run_id,
                 status=_(run.status)), []
    recommended = record.get("recommended_checkpoint", run.recommended_step)
    chosen = record.get("chosen_checkpoint", run.chosen_step)
    scores = [CheckpointScore(**s) for s in record.get("scores", [])]
    if scores:
        table = format_table(scores, recommended, chosen)
        how = t("scored with the %(scorer)s", scorer=record.get("scored_with", "tagger"))
    else:
        table = "\n".join(f"step {s}" for s, _unused in checkpoints)
        how = t("not scored yet (scores come when the run completes)")
    chosen_text = t("; chosen: step %(step)s", step=chosen) if chosen is not None else ""
    text = (t("Checkpoints of `%(run_id)s` (**%(name)s**, %(status)s), %(how)s:", run_id=run.run_id,
              name=run.adapter_name, status=_(run.status), how=how) + f"\n```\n{table}\n```"
            + t("Recommended: step %(step)s%(chosen)s. Choose another with /train checkpoints choose:<step>; make it "
                "live with /adapter promote.", step=recommended if recommended is not None else "—", chosen=chosen_text))
    drift = record.get("drift")
    if isinstance(drift, dict) and drift.get("summary"):  # [training] drift_report
        text += "\n" + t("Fast modes with checkpoint %(step)s: %(summary)s.", step=drift.get("checkpoint", "?"),
                         summary=str(drift["summary"])[:300])
    order = sorted(checkpoints, key=lambda c: (c[0] != chosen, c[0] != recommended, -c[0]))
    files = [_file(folder / "grid.png", f"step-{step:06d}-grid.png")
             for step, folder in order if (folder / "grid.png").is_file()][:max_grids]
    if len(text) > 1990:  # a long run: the whole table as a file, the message keeps the verdict
        files.insert(0, discord.File(io.BytesIO(table.encode("utf-8")), filename="scores.txt"))
        text = text.replace(f"```\n{table}\n```", t("(the table is in scores.txt)") + "\n")
    return text, files
