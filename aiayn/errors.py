"""The one kind of error that is the user's: what they gave cannot be used.

`InputError` (a ValueError) says what is wrong with a text, a file, a setting or a size, in one line:
the CLI prints it as `aiayn: error: ...`, the HTTP API answers it with a 4xx. Every other exception,
a plain ValueError included, is a bug of aiayn's and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """What the user gave (a text, a file, a setting, a size) cannot be used; the message says why."""
