"""The one exception type for problems a user can fix (bad input, missing files, wrong names)."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; CLIs print it as one line and exit with status 2.

    The message says what is wrong, where (file, line, key path) and how to fix it.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        """The single line shown to the user."""
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} — {self.fix}" if self.fix else text
