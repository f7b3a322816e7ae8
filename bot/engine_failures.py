"""The engine's failures as users read them: each protocol error code becomes a translated sentence.

The engine reports a failed job as an error code and an English ``message`` (``protocol.Failed``,
``ErrorResponse``). The code decides what the user is told, in their language; the engine's own
words are added only where they help the user fix the request (which adapter, which limit) and
never where they may name the engine host's files or internals (a missing model, an internal
error: those are in the engine's log for the operator).
"""

from __future__ import annotations

import re

from bot.i18n import N_, Text, _, engine_sentence

# Codes whose engine message helps the user (names an adapter or a limit of the request).
WITH_DETAIL = {
    "bad_request": N_("the engine refused the request: %(detail)s"),
    "unknown_adapter": N_("an adapter is not installed on the engine: %(detail)s"),
    "incompatible_adapter": N_("an adapter could not be used: %(detail)s"),
}
# Codes told without the engine's message.
WITHOUT_DETAIL = {
    "out_of_memory": N_("the GPU ran out of memory; try a smaller size, fewer images or fewer adapters"),
    "model_missing": N_("the engine's model is not available; an admin has to check the engine's log"),
    "queue_full": N_("the engine's queue is full; please try again in a minute"),
    "engine_error": N_("the engine hit an internal error (details are in its log); please try again"),
    "engine_unavailable": N_("the engine is not reachable right now; please try again shortly"),
    "unauthorized": N_("the bot could not authenticate with the engine; an admin has to check the engine secret"),
    "version_mismatch": N_("the bot and the engine are different versions; an admin has to update one of them"),
    "not_found": N_("the engine no longer holds this job; please try again"),
    "canceled": N_("it was canceled"),
}
MAX_DETAIL = 300
# A path of the engine's host (absolute POSIX or Windows, or home-relative): never shown to users.
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:\\|~?/)[^\s'\"`,;)]+")


def detail_text(message: str) -> Text | str:
    """The engine's words, paths replaced, shortened; a known limit sentence is translated."""
    cleaned = _PATH.sub("…", (message or "").strip())
    if len(cleaned) > MAX_DETAIL:
        cleaned = cleaned[:MAX_DETAIL - 1] + "…"
    return engine_sentence(cleaned)


def failure_reason(code: str, message: str) -> Text:
    """Why a job failed, for its user: from the error code, with the engine's detail where it helps."""
    if code in WITH_DETAIL:
        return _(WITH_DETAIL[code], detail=detail_text(message))
    if code in WITHOUT_DETAIL:
        return _(WITHOUT_DETAIL[code])
    return _(WITHOUT_DETAIL["engine_error"])


def job_failed(job_id: str, code: str, message: str) -> Text:
    """The message a user sees when the engine failed their job."""
    return _("❌ Job `%(job_id)s` failed: %(reason)s", job_id=job_id, reason=failure_reason(code, message))


def not_started(code: str, message: str) -> Text:
    """The message a user sees when the engine refused to take their job."""
    return _("❌ Not started: %(reason)s", reason=failure_reason(code, message))


def stored_failure(job_id: str, error: str | None) -> Text:
    """The failure message from a job's stored ``error`` ("code: message"; older rows: a sentence)."""
    code, sep, message = (error or "").partition(": ")
    if sep and (code in WITH_DETAIL or code in WITHOUT_DETAIL):
        return job_failed(job_id, code, message)
    return _("❌ Job `%(job_id)s` failed: %(reason)s", job_id=job_id, reason=detail_text(error or "?"))
