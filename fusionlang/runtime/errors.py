"""Failures of a run that the user can act on (no torch import)."""

from __future__ import annotations


class RunError(Exception):
    """A user-facing failure while running (unreadable input, unwritable output...);
    `at` locates it in the spec (file, line, column[, end line, end column]) when known
    (a save, a source call). `code` is the diagnostic code (docs/language.md)."""

    def __init__(self, message: str, hint: str = "", code: str = "E011", at: tuple | None = None):
        super().__init__(message)
        self.message, self.hint, self.code, self.at = message, hint, code, at

    def __reduce__(self):  # pickled whole (a Ray task's error reaches the driver as it was raised)
        return type(self), (self.message, self.hint, self.code, self.at), self.__dict__


class BadValue(Exception):
    """An output value that is not finite, or beyond its dtype's range (raised where the
    cast is computed; the scheduler turns it into a located RunError, E030/E031)."""

    def __init__(self, node: str, value, source):
        super().__init__(node)
        self.node, self.value, self.source = node, value, source

    def __reduce__(self):
        return type(self), (self.node, self.value, self.source), self.__dict__
