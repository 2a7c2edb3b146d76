"""Text -> AST with Lark (LALR). Syntax errors become diagnostics with a hint."""

from __future__ import annotations

import ast as pyast
import re
import warnings
from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.visitors import Transformer_NonRecursive

from . import ast
from .diagnostics import SOURCES, Diagnostic, FuseErrors, Span


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("fusionlang.grammar").joinpath("fuse.lark").read_text()
    # NOTE: cache=True stores the LALR tables (keyed by the grammar hash) in the temp dir:
    # building them costs more than parsing a spec.
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True, cache=True)


def _span(file: str, meta) -> Span:
    if getattr(meta, "empty", False):
        return Span.unknown(file)
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(file: str, tok: Token) -> Span:
    return Span(file, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)


ESCAPES_HINT = (r'accepted escapes: \\ \" \n \t \r \xHH \uHHHH \UHHHHHHHH \N{NAME} '
                r"(and \a \b \f \v \ooo); write a backslash itself as \\")
_ESCAPE = re.compile(r"\\(N\{[^}]*\}?|x[0-9A-Fa-f]{0,2}|u[0-9A-Fa-f]{0,4}|U[0-9A-Fa-f]{0,8}|[0-7]{1,3}|.)")


def _literal(text: str) -> str:
    # NOTE: the STRING terminal is a subset of Python string syntax, so literal_eval
    # decodes escapes exactly; it never executes code. Unknown escapes (Python keeps
    # them with a warning) are errors here.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return pyast.literal_eval(text)


def decode_string(tok: Token, file: str) -> tuple[str, Diagnostic | None]:
    """A STRING token's value, or a located E001 for an escape that cannot be decoded
    (unknown, truncated, an unknown character name) or that yields a lone surrogate."""
    text = str(tok)
    raw = re.search(r"[\r\x00]", text)
    if raw:  # Python's decoder would end the line (CR) or refuse the source (NUL)
        col = tok.column + raw.start()
        esc, what = (r"\r", "carriage return") if raw.group() == "\r" else (r"\u0000", "NUL character")
        return "", Diagnostic("E001", f"a raw {what} inside a string", Span(file, tok.line, col, tok.line, col + 1),
                              f"write it as the escape {esc}")
    try:
        value = _literal(text)
    except (SyntaxError, ValueError, UnicodeError, DeprecationWarning, SyntaxWarning):
        value = None
    if value is not None and not any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return value, None
    for m in _ESCAPE.finditer(text, 1, len(text) - 1):
        esc = m.group(0)
        try:
            one = _literal('"' + esc + '"')
        except (SyntaxError, ValueError, UnicodeError, DeprecationWarning, SyntaxWarning):
            msg = f"invalid escape '{esc}' in string"
        else:
            if not any(0xD800 <= ord(c) <= 0xDFFF for c in one):
                continue
            msg = f"escape '{esc}' is a lone surrogate, not a character"
        col = tok.column + m.start()
        span = Span(file, tok.line, col, tok.line, col + len(esc))
        hint = ESCAPES_HINT if "surrogate" not in msg else \
            r"write the character itself or its code point with \UHHHHHHHH (e.g. \U0001F600)"
        return "", Diagnostic("E001", msg, span, hint)
    return "", Diagnostic("E001", "invalid string literal", _tok_span(file, tok), ESCAPES_HINT)


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):
    """Builds AST nodes only (without recursion, so long expressions cannot overflow the
    stack); never raises user errors (Lark would wrap them): string escapes that cannot
    be decoded are collected in `errors`."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file
        self.errors: list[Diagnostic] = []

    def _unquote(self, tok: Token) -> str:
        value, diag = decode_string(tok, self.file)
        if diag is not None:
            self.errors.append(diag)
        return value

    def _s(self, meta) -> Span:
        return _span(self.file, meta)

    # --- expressions
    def number(self, meta, c):
        text = str(c[0])
        return ast.Number(self._s(meta), float(text), text)

    def string(self, meta, c):
        return ast.String(self._s(meta), self._unquote(c[0]))

    def true(self, meta, c):
        return ast.Bool(self._s(meta), True)

    def false(self, meta, c):
        return ast.Bool(self._s(meta), False)

    def none(self, meta, c):
        return ast.NoneLit(self._s(meta))

    def dotted(self, meta, c):
        return (".".join(str(t) for t in c), self._s(meta))

    def var(self, meta, c):
        name, span = c[0]
        return ast.Var(span, name)

    def list(self, meta, c):
        return ast.ListExpr(self._s(meta), tuple(x for x in c if x is not None))

    def listcomp(self, meta, c):
        body, var, it = c
        return ast.ListComp(self._s(meta), body, str(var), _tok_span(self.file, var), it)

    def _bin(op):
        def f(self, meta, c):
            return ast.BinOp(self._s(meta), op, c[0], c[1])

        return f

    add, sub, mul, div, eq, ne = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("=="), _bin("!=")

    def neg(self, meta, c):
        return ast.Neg(self._s(meta), c[0])

    def cond(self, meta, c):
        return ast.Cond(self._s(meta), c[0], c[1], c[2])

    def index(self, meta, c):
        return ast.Index(self._s(meta), c[0], c[1])

    def kwarg(self, meta, c):
        return ast.KwArg(self._s(meta), str(c[0]), c[1])

    def args(self, meta, c):
        return list(c)

    def call(self, meta, c):
        (name, fspan), args = c[0], c[1] or []
        pos = tuple(a for a in args if not isinstance(a, ast.KwArg))
        kws = tuple(a for a in args if isinstance(a, ast.KwArg))
        return ast.Call(self._s(meta), name, fspan, pos, kws)

    # --- statements
    def use_stmt(self, meta, c):
        target, alias = c[0], (str(c[1]) if len(c) > 1 and c[1] is not None else None)
        if isinstance(target, Token):
            return ast.Use(self._s(meta), self._unquote(target), True, alias)
        return ast.Use(self._s(meta), target[0], False, alias)

    def model_stmt(self, meta, c):
        return ast.ModelDecl(self._s(meta), str(c[0]), False, c[1])

    def models_stmt(self, meta, c):
        return ast.ModelDecl(self._s(meta), str(c[0]), True, c[1])

    def let_stmt(self, meta, c):
        return ast.Let(self._s(meta), str(c[0]), c[1])

    def param(self, meta, c):
        name, typ, default = c
        return ast.Param(self._s(meta), str(name), str(typ) if typ else None, default)

    def params(self, meta, c):
        return tuple(c)

    def def_stmt(self, meta, c):
        name, params, ret, body = c
        return ast.Def(self._s(meta), str(name), params or (), str(ret) if ret else None, body)

    def rule(self, meta, c):
        return ast.Rule(self._s(meta), self._unquote(c[0]), _tok_span(self.file, c[0]), c[1])

    def rule_block(self, meta, c):
        return tuple(c)

    def merge_stmt(self, meta, c):
        return ast.Merge(self._s(meta), str(c[0]), c[1], c[2] or ())

    def save_stmt(self, meta, c):
        name, path, dtype = c
        return ast.Save(
            self._s(meta),
            str(name),
            _tok_span(self.file, name),
            self._unquote(path),
            _tok_span(self.file, path),
            str(dtype) if dtype else None,
            _tok_span(self.file, dtype) if dtype else None,
        )

    def task_stmt(self, meta, c):
        return ast.TaskDecl(self._s(meta), str(c[0]), c[1])

    def data_stmt(self, meta, c):
        return ast.DataDecl(self._s(meta), str(c[0]), c[1])

    def ensemble_stmt(self, meta, c):
        return ast.EnsembleDecl(self._s(meta), str(c[0]), c[1])

    def eval_names(self, meta, c):
        return tuple((str(t), _tok_span(self.file, t)) for t in c)

    def eval_stmt(self, meta, c):
        models, tasks, report = c
        return ast.Eval(self._s(meta), models, tasks, self._unquote(report) if report else None,
                        _tok_span(self.file, report) if report else None)

    def start(self, meta, c):
        return ast.Module(self._s(meta), self.file, tuple(c))


_TOKEN_NAMES = {
    "NAME": "a name", "STRING": "a string", "NUMBER": "a number", "LPAR": "'('",
    "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "EQUAL": "'='", "COLON": "':'", "PLUS": "'+'", "MINUS": "'-'",
    "STAR": "'*'", "SLASH": "'/'", "DOT": "'.'", "$END": "end of file", "TYPE_NAME": "a type",
}


def _describe_expected(expected: set[str]) -> str:
    names = sorted({_TOKEN_NAMES.get(e, repr(e.lower()) if e.isupper() else e) for e in expected})
    if len(names) > 6:
        names = names[:6] + ["..."]
    return ", ".join(names)


def _syntax_diag(file: str, err: UnexpectedInput) -> Diagnostic:
    line, col = getattr(err, "line", 1) or 1, getattr(err, "column", 1) or 1
    if isinstance(err, UnexpectedCharacters):
        ch = err.char
        hint = "strings use double quotes" if ch == "'" else "remove or quote this character"
        return Diagnostic("E001", f"unexpected character {ch!r}", Span(file, line, col, line, col + 1), hint)
    if isinstance(err, UnexpectedEOF):
        return Diagnostic("E001", "unexpected end of file", Span(file, line, col), "a statement or bracket is not finished")
    assert isinstance(err, UnexpectedToken)
    tok = err.token
    exp = _describe_expected(set(err.expected))
    if tok.type == "$END":
        return Diagnostic("E001", "unexpected end of file", Span(file, line, col), f"expected {exp}")
    text = str(tok)
    hint = f"expected {exp}"
    keywords = {"MODEL", "MODELS", "MERGE", "LET", "DEF", "USE", "SAVE", "TO", "AS", "IN", "FOR", "IF", "THEN", "ELSE",
                "TRUE", "FALSE", "NONE"}
    if tok.type in keywords and ("NAME" in err.expected or tok.type in {"IF", "THEN", "ELSE", "TRUE", "FALSE", "NONE"}
                                 and "NAME" in err.expected):
        hint = f"'{text}' is a keyword and cannot be used as a name"
    end = tok.end_column if tok.end_column else col + len(text)
    return Diagnostic("E001", f"unexpected {text!r}", Span(file, line, col, line, end), hint)


_STMT_START = re.compile(r"^(use|model|models|let|def|merge|save|task|data|ensemble|eval)\b", re.MULTILINE)
_OPEN = {"(": ")", "[": "]", "{": "}"}
MAX_SYNTAX_ERRORS = 20


def _error_offset(err: UnexpectedInput) -> int | None:
    if isinstance(err, UnexpectedToken) and err.token.type != "$END":
        return err.token.start_pos
    if isinstance(err, UnexpectedCharacters):
        return err.pos_in_stream
    return None  # the end of the file


def _unclosed(text: str, end: int) -> tuple[str, int, int] | None:
    """The innermost bracket still open at offset `end`: (bracket, line, col)."""
    stack: list[tuple[str, int, int]] = []
    line, col, i = 1, 1, 0
    while i < end:
        ch = text[i]
        if ch == "#":
            while i < end and text[i] != "\n":
                i += 1
            continue
        if ch == '"':
            i, col = i + 1, col + 1
            while i < end and text[i] not in '"\n':
                step = 2 if text[i] == "\\" else 1
                i, col = i + step, col + step
        elif ch in _OPEN:
            stack.append((ch, line, col))
        elif ch in _OPEN.values() and stack and _OPEN[stack[-1][0]] == ch:
            stack.pop()
        if i < end and text[i] == "\n":
            line, col = line + 1, 1
        else:
            col += 1
        i += 1
    return stack[-1] if stack else None


def _with_origin(diag: Diagnostic, text: str, err: UnexpectedInput) -> Diagnostic:
    """Name the bracket that an error is about: one never closed, or a stray closing one."""
    if isinstance(err, UnexpectedCharacters):
        return diag
    off = _error_offset(err)
    open_ = _unclosed(text, len(text) if off is None else off)
    tok = str(err.token) if isinstance(err, UnexpectedToken) else ""
    if tok in _OPEN.values() and open_ is None:
        opener = next(k for k, v in _OPEN.items() if v == tok)
        return Diagnostic(diag.code, diag.message, diag.span, f"this '{tok}' closes no '{opener}': remove it")
    if tok in _OPEN.values() and _OPEN[open_[0]] != tok:
        ch, line, col = open_
        return Diagnostic(diag.code, diag.message, diag.span,
                          f"the '{ch}' at {line}:{col} is closed with '{_OPEN[ch]}', not '{tok}'")
    # NOTE: only at the end of the file or at a new statement: inside a statement that
    # spans lines, an open bracket is normal (the error is then e.g. a missing ',')
    at_statement = off is None or _STMT_START.match(text, off) is not None
    if open_ is None or not at_statement:
        return diag
    ch, line, col = open_
    return Diagnostic(diag.code, diag.message, diag.span,
                      f"the '{ch}' at {line}:{col} is never closed: add '{_OPEN[ch]}' where its contents end")


# NOTE: every stage after the parser (checker, lowering, fmt) walks expressions
# recursively; this bound keeps them far from Python's recursion limit.
MAX_EXPR_DEPTH = 100


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + "".join(c if c == "\n" else " " for c in text[start:end]) + text[end:]


def decode_source(data: bytes, file: str) -> str:
    """The text of a spec file's bytes (UTF-8, an optional BOM dropped); raises FuseErrors
    with an E001 at the line and column of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start
        head = data[:start]
        line = head.count(b"\n") + 1
        col = len(head[head.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        SOURCES.add(file, data.decode("utf-8", "replace"))
        raise FuseErrors([Diagnostic("E001", f"the file is not valid UTF-8: byte 0x{data[start]:02x} cannot start or "
                                     "continue a character", Span(file, line, col, line, col + 1),
                                     "save the file as UTF-8 (or remove this byte)")]) from None


def read_source(path: str) -> str:
    """Read a spec file as UTF-8; raises FuseErrors (E008 when it cannot be read, E001 at
    the first byte that is not UTF-8)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise FuseErrors([Diagnostic("E008", f"spec file '{path}' does not exist", Span(path, 1, 1),
                                     "check the path")]) from None
    except (OSError, ValueError) as e:
        raise FuseErrors([Diagnostic("E008", f"cannot read '{path}': {getattr(e, 'strerror', None) or e}",
                                     Span(path, 1, 1), "check that the path names a readable file")]) from None
    return decode_source(data, path)


def parse(text: str, file: str = "<string>") -> ast.Module:
    """Parse a .fuse source; raises FuseErrors with every syntax diagnostic found.

    Error recovery: the statement holding an error is blanked out (newlines kept, so
    positions stay right) from its first line to the next line that starts a statement,
    and the rest is parsed again."""
    SOURCES.add(file, text)
    diags: list[Diagnostic] = []
    src = text
    while True:
        try:
            tree: Tree = _parser().parse(src)
            break
        except UnexpectedInput as err:
            diags.append(_with_origin(_syntax_diag(file, err), src, err))
            off = _error_offset(err)
            if off is None or len(diags) >= MAX_SYNTAX_ERRORS:
                break
            starts = [m.start() for m in _STMT_START.finditer(src)]
            start = max((s for s in starts if s < off), default=0)
            nxt = min((s for s in starts if s >= off and s > start), default=None)
            if nxt is None:
                break
            src = _blank(src, start, nxt)
    if diags:
        raise FuseErrors(diags)
    return to_ast(tree, file)


def to_ast(tree: Tree, file: str) -> ast.Module:
    """The AST of a parse tree; raises FuseErrors for strings that cannot be decoded and
    for expressions nested too deep."""
    builder = _ToAst(file)
    mod = builder.transform(tree)
    errors = list(builder.errors)
    for stmt in mod.stmts:
        for e in ast.stmt_exprs(stmt):
            n, deepest = ast.depth(e)
            if n > MAX_EXPR_DEPTH:
                errors.append(Diagnostic(
                    "E001", f"expression too deep: it nests {n} levels (limit {MAX_EXPR_DEPTH})", deepest.span,
                    "split it into `let` steps, or add many models with sum([...]) / weighted([...], [...])"))
                break
    if errors:
        raise FuseErrors(errors)
    return mod
