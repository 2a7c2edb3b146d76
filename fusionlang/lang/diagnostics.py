"""Source spans, diagnostics and their compiler-style rendering.

Every user mistake becomes a `Diagnostic` with a span; a stage collects all of them
and raises `FuseErrors` once, so the CLI can print every error of a file at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Span:
    """A region of a source file (1-based line and column)."""

    file: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    @staticmethod
    def unknown(file: str = "<unknown>") -> Span:
        return Span(file, 1, 1, 1, 1)


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span
    hint: str = ""
    severity: str = "error"  # error | warning | note

    def __post_init__(self) -> None:
        # NOTE: the contract is a non-empty hint on every error; a site that has nothing
        # specific to say points at the code's entry in the language reference.
        if self.severity == "error" and not self.hint.strip():
            object.__setattr__(self, "hint", DEFAULT_HINTS.get(self.code, "see the error table in docs/language.md"))

    def to_json(self) -> dict:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "file": self.span.file,
            "line": self.span.line,
            "col": self.span.col,
            "hint": self.hint,
        }


DEFAULT_HINTS = {
    "E001": "check the syntax near here against docs/language.md",
    "E002": "declare the name before using it, or `use` the module that defines it",
    "E003": "rename one of the two definitions",
    "E004": "compare the call with the function's signature",
    "E005": "the value has the wrong type here; see 'Values and types' in docs/language.md",
    "E006": "the value is not allowed here; see the parameter's range or choices in docs/language.md",
    "E007": "break the cycle of `use`s",
    "E008": "check the path or module name",
    "E009": "a definition cannot depend on itself",
    "E010": "check that the model directory exists and holds config.json and *.safetensors",
    "E011": "the file is damaged or not a safetensors model: re-create or re-download it",
    "E012": "check the rule's pattern against the model's tensor names",
    "E013": "the models must have the same tensor names; use rules to treat the others",
    "E014": "the models must share an architecture",
    "E015": "add a `save NAME to \"DIR\"` statement",
    "E016": "choose another output directory",
    "E017": "the model must be in the local Hugging Face cache",
    "E018": "build the zoo first: fusionlang zoo build NAME",
    "E019": "see 'Choosing arguments on a validation split' in docs/language.md",
}


class FuseErrors(Exception):
    """One or more user errors; carries every diagnostic found by a stage."""

    def __init__(self, diagnostics: list[Diagnostic]):
        super().__init__("; ".join(f"{d.span}: {d.message}" for d in diagnostics))
        self.diagnostics = list(diagnostics)
        self.partial = None  # checker errors: the program without the definitions that had them

    def __reduce__(self):  # pickled whole (raised in a Ray task)
        return type(self), (self.diagnostics,), self.__dict__


@dataclass
class DiagnosticSink:
    """Collects diagnostics during a stage; `raise_if_errors` ends the stage."""

    items: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, span: Span, hint: str = "") -> None:
        self.items.append(Diagnostic(code, message, span, hint))

    def warning(self, code: str, message: str, span: Span, hint: str = "") -> None:
        self.items.append(Diagnostic(code, message, span, hint, "warning"))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise FuseErrors(self.items)


class SourceCache:
    """Source text by file name, so diagnostics can show the offending line."""

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}

    def add(self, file: str, text: str) -> None:
        self._texts[file] = text

    def line(self, file: str, line: int) -> str | None:
        text = self._texts.get(file)
        if text is None:
            try:
                text = Path(file).read_bytes().decode("utf-8", "replace")
            except (OSError, ValueError):
                return None
            self._texts[file] = text
        # NOTE: split at "\n" only, as the parser counts lines (splitlines() would also
        # break at \u2028, \x85, ... inside a string and shift every later line)
        lines = text.split("\n")
        return lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else None


SOURCES = SourceCache()


def render(diag: Diagnostic, color: bool = False) -> str:
    """Format like a compiler: location, code, message, source line, caret, hint."""
    red, blue, bold, reset = ("\x1b[31m", "\x1b[34m", "\x1b[1m", "\x1b[0m") if color else ("",) * 4
    if diag.severity == "warning":
        red = "\x1b[33m" if color else ""
    out = [f"{bold}{diag.span}: {red}{diag.severity}[{diag.code}]{reset}{bold}: {diag.message}{reset}"]
    src = SOURCES.line(diag.span.file, diag.span.line)
    if src is not None:
        gutter = f"{diag.span.line:>4} | "
        width = 1
        if diag.span.end_line == diag.span.line and diag.span.end_col > diag.span.col:
            width = diag.span.end_col - diag.span.col
        src, col, width = _clip(src.replace("\t", " "), diag.span.col, width)
        out.append(f"{blue}{gutter}{reset}{src}")
        out.append(f"{blue}{' ' * (len(gutter) - 2)}| {reset}{' ' * (col - 1)}{red}{'^' * width}{reset}")
    if diag.hint:
        out.append(f"{blue}  = hint:{reset} {diag.hint}")
    return "\n".join(out)


MAX_SHOWN = 120  # characters of a source line shown under a diagnostic


def _clip(src: str, col: int, width: int) -> tuple[str, int, int]:
    """A long source line cut to a window around the column (with "..." where cut); the
    column and caret width within what is shown."""
    width = max(1, min(width, MAX_SHOWN // 2))
    if len(src) <= MAX_SHOWN:
        return src, col, width
    start = max(0, min(col - 1 - MAX_SHOWN // 3, len(src) - MAX_SHOWN))
    shown = src[start:start + MAX_SHOWN]
    lead = "..." if start > 0 else ""
    tail = "..." if start + MAX_SHOWN < len(src) else ""
    return lead + shown + tail, col - start + len(lead), width


def render_all(diags: list[Diagnostic], color: bool = False) -> str:
    return "\n\n".join(render(d, color) for d in diags)


def to_json(diags: list[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in diags], indent=2)
