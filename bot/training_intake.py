"""What /train checks and fetches of an admin's upload before any of it reaches a dataset.

File types and the size cap are checked before downloading (from the attachments' declared names
and sizes); the bytes themselves are checked again by ``training.data.intake``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import discord

from bot.errors import InvalidOption, Refused
from bot.i18n import _, ngettext

IMAGE_HELP = _("attach PNG, JPEG, WebP, GIF or BMP images (image1..image10) or a .zip of them (optional .txt "
               "captions)")


def attachment_list(*items: Optional[discord.Attachment]) -> list[discord.Attachment]:
    return [a for a in items if a is not None]


def check_uploads(attachments: list[discord.Attachment], max_bytes: int, *, captions_ok: bool = True) -> None:
    """Refuse, before downloading, files that cannot be training images and uploads over the cap."""
    from training.data.intake import CAPTION_SUFFIX, IMAGE_SUFFIXES

    allowed = set(IMAGE_SUFFIXES) | {".zip"} | ({CAPTION_SUFFIX} if captions_ok else set())
    bad = [a.filename for a in attachments if Path(a.filename).suffix.lower() not in allowed]
    if bad:
        raise InvalidOption(ngettext("Not started: %(files)s is not an image or a .zip; %(help)s.",
                                     "Not started: %(files)s are not images or .zip files; %(help)s.", len(bad),
                                     files=", ".join(bad), help=IMAGE_HELP))
    total = sum(a.size for a in attachments)
    if total > max_bytes:
        raise InvalidOption(_("Not started: the upload is %(size)s MiB; at most %(limit)s MiB in all.",
                              size=f"{total / 2**20:.1f}", limit=f"{max_bytes / 2**20:.0f}"))


def check_caption_uploads(attachments: list[discord.Attachment]) -> None:
    """Refuse, before downloading, caption uploads that are not ``.txt`` files or are over the caption cap."""
    from training.data.intake import CAPTION_SUFFIX, MAX_CAPTION_BYTES

    bad = [a.filename for a in attachments if Path(a.filename).suffix.lower() != CAPTION_SUFFIX]
    if bad:
        raise InvalidOption(ngettext(
            "No captions changed: %(files)s is not a %(suffix)s file; upload NAME.txt files (UTF-8 text) to replace "
            "the captions of NAME.png.", "No captions changed: %(files)s are not %(suffix)s files; upload NAME.txt "
            "files (UTF-8 text) to replace the captions of NAME.png.", len(bad), suffix=CAPTION_SUFFIX,
            files=", ".join(bad)))
    big = [a.filename for a in attachments if a.size > MAX_CAPTION_BYTES]
    if big:
        raise InvalidOption(ngettext(
            "No captions changed: %(files)s is over %(limit)s KiB; a caption file may be at most %(limit)s KiB.",
            "No captions changed: %(files)s are over %(limit)s KiB; a caption file may be at most %(limit)s KiB.",
            len(big), limit=MAX_CAPTION_BYTES // 1024, files=", ".join(big)))


async def download(attachments: list[discord.Attachment]) -> list[tuple[str, bytes]]:
    """The attachments' bytes as (file name, bytes); a failed download is a message, not a crash."""
    files = []
    for a in attachments:
        try:
            files.append((a.filename, await a.read()))
        except (discord.HTTPException, discord.NotFound) as exc:
            raise Refused(_("Could not download `%(file)s` from Discord (%(error)s); please try again.",
                            file=a.filename, error=exc)) from None
    return files


def check_adapter_name(name: str) -> str:
    from engine.contract.training_errors import LifecycleError
    from training.data.lifecycle import check_name

    try:
        return check_name(name)
    except LifecycleError as exc:
        raise InvalidOption(_("Not started: %(reason)s.", reason=exc.message)) from None


def refused_summary(refused: list[Any], language: str | None = None, limit: int = 8) -> str:
    lines = [f"• `{r.name}`: {r.reason}" for r in refused[:limit]]
    if len(refused) > limit:
        lines.append(_("• … and %(n)s more", n=len(refused) - limit).render(language))
    return "\n".join(lines)
