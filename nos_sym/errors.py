"""The errors (and warnings) a user's input can cause, shared by the CLI and the layers it runs.

The CLI prints an error as one line ``nos-sym: error: ...`` and exits with status 2, and a
:class:`InputWarning` as one line ``nos-sym: warning: ...``. This module imports nothing of
nos_sym, so any module may raise these without an import cycle.
"""

from __future__ import annotations

__all__ = ["CommandError", "InputWarning", "SearchError", "UserError"]


class UserError(Exception):
    """Raised for what the user gave (a rule, a file, an option), never for a bug: the CLI
    prints it as one line and exits with status 2. The layers' own errors derive from it."""


class CommandError(UserError):
    """A user-facing error of a command's arguments: printed as one line, exit status 2."""


class SearchError(UserError):
    """A run that cannot start or resume (bad run directory, config mismatch, no CUDA, ...)."""


class InputWarning(UserWarning):
    """Something in the user's files is off, and the work goes on without it (e.g. a torn last
    line of a sample log)."""
