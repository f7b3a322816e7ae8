"""Errors of the bot. ``UserFacingError`` carries a message meant for the Discord user.

The command tree's one ``on_error`` turns a ``UserFacingError`` into an ephemeral reply;
anything else is logged with its traceback and the user gets a short generic message.
"""

from __future__ import annotations


class BotError(Exception):
    """Base of every error the bot raises on purpose."""


class UserFacingError(BotError):
    """Something the user can fix or should know; ``message`` is shown to them as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidOption(UserFacingError):
    """An option is outside what is allowed; the message says what is."""


class Refused(UserFacingError):
    """A limit, role, channel or content rule refused the request; the message says why."""


class NotAllowed(Refused):
    """The user lacks the permission the action needs (not the author, not an admin)."""


class JobNotFound(UserFacingError):
    """No job with that id (or seed) is known."""


class StartupError(BotError):
    """The bot cannot start; the message says exactly what to do. Exit non-zero."""
