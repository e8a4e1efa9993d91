"""The one exception type for bad user input: the CLI prints its message as one line and exits 2.

Anything else that escapes a command is a bug, shown with its traceback (exit 1)."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a flag, a config key, a file, a record); the message is one line naming it."""
