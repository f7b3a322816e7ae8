"""Errors of the bot. ``UserFacingError`` carries a message meant for the Discord user.

The command tree's one ``on_error`` turns a ``UserFacingError`` into an ephemeral reply;
anything else is logged with its traceback and the user gets a short generic message.
"""

from __future__ import annotations


class BotError(Exception):
    """Base of every error the bot raises on purpose."""


class UserFacingError(BotError):
    """Something the user can fix or should know; ``message`` is shown to them as is.

    ``message`` may be a ``bot.i18n.Text``: ``.message`` is then its English text and ``.text``
    renders in the user's language (``text_for``).
    """

    def __init__(self, message: object) -> None:
        super().__init__(str(message))
        self.message = str(message)
        self.text = message

    def text_for(self, language: str | None) -> str:
        """The message in ``language`` (a catalog name from ``bot.i18n``), English when None."""
        from bot.i18n import localize

        return localize(self.text, language)


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
