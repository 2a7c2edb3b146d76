"""Front-end hardening: inputs that once crashed or misled the parser, checker and fmt.

Each test builds its inputs in tmp_path and runs the real CLI in-process (`run_cli`), then
asserts the exact located diagnostic (code, line:col, a non-empty hint), or real values
of a merged tiny model against plain torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_state, run_cli, write_spec

from fusionlang.lang import ast
from fusionlang.lang.diagnostics import DiagnosticSink
from fusionlang.lang.fmt import format_source
from fusionlang.lang.parser import MAX_EXPR_DEPTH, parse
from fusionlang.lang.values import FLOAT32_MAX, MAX_EVAL_DEPTH, check_param_value


def check_json(path: Path) -> tuple[int, list[dict]]:
    """`fusionlang check --format json`: exit code and the file's diagnostics."""
    rc, out, err = run_cli("check", "--format", "json", str(path))
    assert "Traceback" not in out + err, out + err
    return rc, json.loads(out)[0]["diagnostics"]


def errors_of(rc: int, diags: list[dict], code: str) -> list[dict]:
    assert rc == 1, diags
    found = [d for d in diags if d["severity"] == "error" and d["code"] == code]
    assert found, diags
    for d in found:
        assert d["hint"].strip(), d
    return found


def cli_error(args: list[str], code: str, at: tuple[int, int], cwd: Path | None = None) -> str:
    """Run a command that must fail with a located `code` at `at`; returns stderr."""
    rc, out, err = run_cli(*args, cwd=cwd)
    assert "Traceback" not in out + err and "internal error" not in err, out + err
    assert rc == 1, out + err
    assert f":{at[0]}:{at[1]}: error[{code}]" in err, err
    assert "= hint: " in err, err
    return err


def col_of(text: str, needle: str) -> int:
    return text.index(needle) + 1


# ---------------------------------------------------------------------- strings and bytes
@pytest.mark.parametrize("literal, escape", [
    (r'"\N{foo}"', r"\N{foo}"), (r'"\x4"', r"\x4"), (r'"\u12"', r"\u12"), (r'"ab\ud800"', r"\ud800"),
    (r'"\d"', r"\d"), (r'"\U00110000"', r"\U00110000"),
])
@pytest.mark.parametrize("cmd", ["check", "compile", "fmt"])
def test_undecodable_escape_is_located_e001(tmp_path, literal, escape, cmd):
    text = f"let x = {literal}\n"
    p = write_spec(tmp_path, text)
    err = cli_error([cmd, str(p)], "E001", (1, col_of(text, escape)))
    assert escape in err
    hint = err.split("= hint: ")[1]
    assert (r"\UHHHHHHHH" in hint) and (r"\N{NAME}" in hint or "surrogate" in err)


def test_accepted_escapes_decode_like_python(tmp_path):
    text = r'let x = "a\tb\u00e9\N{LATIN SMALL LETTER A}\\\"\x41\U0001F600"' + "\n"
    mod = parse(text, "t.fuse")
    assert mod.stmts[0].value.value == "a\tb\u00e9a\\\"A\U0001F600"
    again = parse(format_source(text, "t.fuse"), "t.fuse")  # fmt keeps the value
    assert again.stmts[0].value.value == mod.stmts[0].value.value


@pytest.mark.parametrize("cmd", ["check", "compile", "fmt"])
def test_file_not_utf8_is_e001_at_the_byte(tmp_path, cmd):
    p = tmp_path / "spec.fuse"
    p.write_bytes(b'let x = 1\nlet y = "ab\xff"\n')
    err = cli_error([cmd, str(p)], "E001", (2, 12))
    assert "UTF-8" in err


def test_used_file_not_utf8_is_e001_in_that_file(tmp_path):
    (tmp_path / "lib.fuse").write_bytes(b"let a = 1\n\n  let b = \xc3\x28\n")
    p = write_spec(tmp_path, 'use "lib.fuse"\nlet x = a\n')
    err = cli_error(["check", str(p)], "E001", (3, 11))
    assert "lib.fuse:3:11" in err


@pytest.mark.parametrize("stmt, needle", [
    ('model a = local("a\\u0000b")\nsave a to "out"\n', '"a\\u0000b"'),
    ('model a = local("a")\nsave a to "o\\u0000ut"\n', '"o\\u0000ut"'),
    ('let p = "a\\u0000b"\nmodel a = local(p)\nmodel b = local(p)\nsave a to "out"\n', '"a\\u0000b"'),
    ('model a = local("' + "x" * 5000 + '")\nsave a to "out"\n', '"xxx'),
    ('model a = local("a/' + "y" * 300 + '/c")\nsave a to "out"\n', '"a/'),
    ('model a = local("a")\nsave a to "' + "z" * 5000 + '"\n', '"zzz'),
])
def test_nul_and_overlong_paths_are_located_e006(tmp_path, stmt, needle):
    p = write_spec(tmp_path, stmt)
    line = next(i + 1 for i, s in enumerate(stmt.splitlines()) if needle in s)
    col = stmt.splitlines()[line - 1].index(needle) + 1
    err = cli_error(["check", str(p)], "E006", (line, col))
    assert "NUL" in err or "too long" in err
    cli_error(["run", str(p), "-q"], "E006", (line, col))
    assert not (tmp_path / "out").exists()


def test_error_on_a_huge_line_is_clipped(tmp_path):
    text = 'let x = "' + "x" * 2_000_000 + '" + 1 + $\n'  # a 2 MB line
    p = write_spec(tmp_path, text)
    err = cli_error(["check", str(p)], "E001", (1, len(text) - 1))
    assert len(err) < 2000
    src, caret = [ln for ln in err.splitlines() if ln.startswith(("   1 | ", "     | "))]
    assert src[caret.index("^")] == "$"  # the caret still points at the character


# ---------------------------------------------------------------------- numbers
def ties_spec(tmp_path: Path, llama, args: str, pre: str = "") -> Path:
    return write_spec(tmp_path, f"""use merging
model base = local("{llama['base']}")
models experts = [local("{llama['e0']}"), local("{llama['e1']}")]
{pre}merge m = ties(base, experts, {args})
save m to "{tmp_path / 'out'}"
""")


@pytest.mark.parametrize("args, needle, words", [
    ("density=1e999 - 1e999", "1e999", "overflows to infinity"),
    ("density=[0.1, 1e999 - 1e999]", "1e999", "overflows to infinity"),
    ("density=0.5, scale=1e999", "1e999", "overflows to infinity"),
    ("density=0.5, scale=1e300 * 1e300", "1e300 * 1e300", "overflows"),
    ("density=0.5, scale=1e39", "1e39", "beyond float32 range"),
    ("density=0.5, scale=[0.5, -1e39]", "-1e39", "beyond float32 range"),
])
def test_non_finite_numbers_are_located_e006(tmp_path, llama, args, needle, words):
    p = ties_spec(tmp_path, llama, args)
    text = p.read_text()
    err = cli_error(["check", str(p)], "E006", (4, text.splitlines()[3].index(needle) + 1))
    assert words in err
    cli_error(["run", str(p), "-q", "--device", "cpu"], "E006", (4, text.splitlines()[3].index(needle) + 1))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_range_check_rejects_nan_and_inf(value):
    sink = DiagnosticSink()
    from fusionlang.lang.diagnostics import Span

    assert not check_param_value(sink, "density", "trim", None, (0.0, 1.0), "number", value, Span("s", 1, 1))
    assert sink.errors[0].code == "E006" and "out of range" in sink.errors[0].message and sink.errors[0].hint
    sink = DiagnosticSink()
    assert not check_param_value(sink, "k", "scale", None, None, "number", value, Span("s", 1, 1))
    assert sink.errors[0].code == "E006" and "finite" in sink.errors[0].message
    sink = DiagnosticSink()  # each point of a gradient
    assert not check_param_value(sink, "density", "trim", None, (0.0, 1.0), "number", [0.2, value], Span("s", 1, 1))
    assert sink.errors[0].code == "E006"
    assert check_param_value(DiagnosticSink(), "k", "scale", None, None, "number", FLOAT32_MAX, Span("s", 1, 1))
    assert not check_param_value(DiagnosticSink(), "k", "scale", None, None, "number", FLOAT32_MAX * 2, Span("s", 1, 1))


@pytest.mark.parametrize("expr, needle, code", [
    ("slices([layers(base, 0, 1e999)])", "1e999", "E006"),
    ("slices([layers(base, 0, 1.5)])", "1.5", "E005"),
    ("base * ramp([0.1, 0.2], 1)", "[0.1, 0.2]", "E005"),
    ("base * ramp(0.1, 1e999)", "1e999", "E006"),
    ("base * 1e39", "base * 1e39", "E006"),
    ("base / 1e-39", "base / 1e-39", "E006"),
    ("base * [1.0, 2.0][1e999]", "1e999", "E006"),
])
def test_bad_numbers_in_builtins_and_scales(tmp_path, llama, expr, needle, code):
    text = f'model base = local("{llama["base"]}")\nmerge m = {expr}\nsave m to "out"\n'
    p = write_spec(tmp_path, text)
    cli_error(["check", str(p)], code, (2, text.splitlines()[1].index(needle) + 1))


# ---------------------------------------------------------------------- depth
DEEP = {
    "sum": "let x = " + "+".join(["1"] * 2000),
    "neg": "let x = " + "-" * 600 + "1",
    "list": "let x = " + "[" * 500 + "1" + "]" * 500,
    "index": "let x = [1]" + "[0]" * 600,
    "call": 'model b = local("b")\nmerge m = ' + "lerp(" * 500 + "b" + ", b)" * 500,
    "cond": "let x = " + "if true then 1 else " * 600 + "2",
    "def_default": "def f(x = " + "(" * 3 + "+".join(["1"] * 300) + ")" * 3 + ") = x",
}


@pytest.mark.parametrize("name", sorted(DEEP))
@pytest.mark.parametrize("cmd", ["check", "compile", "fmt"])
def test_too_deep_expression_is_e001(tmp_path, name, cmd):
    p = write_spec(tmp_path, DEEP[name] + "\n")
    rc, out, err = run_cli(cmd, str(p))
    assert "Traceback" not in out + err and rc == 1, err[-2000:]
    assert "error[E001]: expression too deep" in err and f"(limit {MAX_EXPR_DEPTH})" in err
    assert "= hint: " in err


def test_many_parentheses_are_not_depth(tmp_path):
    p = write_spec(tmp_path, "let x = " + "(" * 500 + "1" + ")" * 500 + "\n")
    assert run_cli("check", str(p))[0] == 0
    assert run_cli("fmt", str(p))[1] == "let x = 1\n"


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("kind", ["let", "def"])
def test_long_definition_chains_are_e006(tmp_path, order, kind):
    n = 1500
    if kind == "let":
        links = [f"let a{i} = a{i + 1} + 1\n" for i in range(n)] + [f"let a{n} = 1\n"]
    else:
        links = [f"def f{i}(x) = f{i + 1}(x) + 1\n" for i in range(n)] + [f"def f{n}(x) = x\n", "let y = f0(1)\n"]
        if order == "reverse":
            links = links[:-1]
    if order == "reverse":
        links.reverse()
        if kind == "def":
            links.append("let y = f0(1)\n")
    p = write_spec(tmp_path, "".join(links))
    for cmd in ("check", "compile"):
        rc, out, err = run_cli(cmd, str(p))
        assert "Traceback" not in out + err and rc == 1, err[-2000:]
        assert "error[E006]: " in err and "too deep" in err and "= hint: " in err
    assert run_cli("fmt", str(p))[0] == 0


def test_deep_but_allowed_programs_merge_right(tmp_path, llama):
    """Just inside the limits: a 99-term sum and a 120-link chain of lets, in reverse
    order, then merged and compared with plain torch."""
    n_links = 120
    lets = [f"let a{n_links} = 0\n"] + [f"let a{i} = a{i + 1} + 1\n" for i in reversed(range(n_links))]
    terms = " + ".join(["e"] * 50 + ["base"] * 49)
    text = (f'model base = local("{llama["base"]}")\nmodel e = local("{llama["e0"]}")\n' + "".join(lets)
            + f"merge s = {terms}\nmerge c = base * (a0 / 200)\n"
            + f'save s to "{tmp_path / "s"}"\nsave c to "{tmp_path / "c"}"\n')
    assert len(terms.split("+")) < MAX_EXPR_DEPTH and 2 * n_links < MAX_EVAL_DEPTH
    p = write_spec(tmp_path, text)
    rc, _out, err = run_cli("run", str(p), "-q", "--device", "cpu")
    assert rc == 0, err
    base, e = load_state(llama["base"]), load_state(llama["e0"])
    s, c = load_state(tmp_path / "s"), load_state(tmp_path / "c")
    for k in base:
        assert (s[k] - (50 * e[k] + 49 * base[k])).abs().max() <= 1e-4 * (1 + (50 * e[k]).abs().max())
        assert (c[k] - base[k] * 0.6).abs().max() <= 1e-6


# ---------------------------------------------------------------------- fmt
def _shape(e):
    """An expression's structure without spans (to compare meaning before and after fmt)."""
    if isinstance(e, ast.Node):
        return (type(e).__name__,) + tuple(_shape(getattr(e, f)) for f in e.__dataclass_fields__ if f not in
                                           ("span", "var_span", "func_span", "name_span", "path_span",
                                            "pattern_span", "dtype_span", "report_span", "text"))
    if isinstance(e, (tuple, list)):
        return tuple(_shape(x) for x in e)
    return e


@pytest.mark.parametrize("src, want", [
    ("(1 == 2) == true", "(1 == 2) == true"),
    ("(1 != 2) != false", "(1 != 2) != false"),
    ("1 == (2 == 3)", "1 == (2 == 3)"),
    ("(1 == 2) != (3 != 4)", "(1 == 2) != (3 != 4)"),
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("a / (b * c)", "a / (b * c)"),
    ("a / (b / c)", "a / (b / c)"),
    ("-(a + b)", "-(a + b)"),
    ("-(-a)", "--a"),
    ("(if t then a else b) + 1", "(if t then a else b) + 1"),
    ("if (if t then t else t) then a else b", "if (if t then t else t) then a else b"),
    ("(a + b)[0]", "(a + b)[0]"),
    ("-(x[0])", "-x[0]"),
    ("(-a) * b", "-a * b"),
    ("((a))", "a"),
])
def test_fmt_keeps_needed_parentheses(src, want):
    text = f"let x = {src}\n"
    out = format_source(text, "t.fuse")
    assert out == f"let x = {want}\n"
    assert _shape(parse(out).stmts) == _shape(parse(text).stmts)
    assert format_source(out, "t.fuse") == out


def test_fmt_repeated_comment_text_is_idempotent():
    text = "# note\nlet a = 1\n\n# note\nlet b = 2\n# note\nlet c = 3  # note\n"
    once = format_source(text, "t.fuse")
    assert once == text
    assert format_source(once, "t.fuse") == once


def test_fmt_keeps_equality_merges_same_plan(tmp_path, llama):
    """Case 10: fmt output of a merge chosen by flags compiles to the same plan."""
    text = (f'use merging\nmodel base = local("{llama["base"]}")\nmodel e = local("{llama["e0"]}")\n'
            "let flag = (1 == 2) == false\nlet other = (1 != 2) != false\n"
            "merge m = if flag then task_arithmetic(base, [e], scale=0.5) else base\n"
            "merge n = if other then base else average([base, e])\n"
            f'save m to "{tmp_path / "m"}"\nsave n to "{tmp_path / "n"}"\n')
    p = write_spec(tmp_path, text)
    rc, formatted, _err = run_cli("fmt", str(p))
    assert rc == 0 and "(1 == 2) == false" in formatted and "(1 != 2) != false" in formatted
    q = write_spec(tmp_path, formatted, "formatted.fuse")

    def plan(path):
        out = tmp_path / (path.stem + ".json")
        assert run_cli("compile", str(path), "--emit", "json", "-o", str(out), "-q")[0] == 0
        data = json.loads(out.read_text())
        strip = lambda xs: [{k: v for k, v in x.items() if k not in ("loc", "at")} for x in xs]
        return strip(data["nodes"]), strip(data["outputs"])

    assert plan(p) == plan(q)


# ---------------------------------------------------------------------- hints
@pytest.mark.parametrize("text, needle, code, words", [
    ("let x = frobnicate(1)\n", "frobnicate", "E002", "def frobnicate"),
    ('let x = -"a"\n', '-"a"', "E005", "negated"),
    ("let x = if 1 then 2 else 3\n", "1 then", "E005", "=="),
    ('let x = if true then 1 else "a"\n', "if", "E005", "same kind"),
    ("def f(a, a) = a\n", "a)", "E003", "own name"),
    ('def f(a: number = "s") = a\n', '"s"', "E005", "default of type number"),
    ("def f() -> model = 1\n", "1", "E005", "-> int"),
    ("let xs = [1, 2]\nlet y = xs[true]\n", "true", "E005", "experts[0]"),
    ("def f(a) = a\nlet y = f\n", "f\n", "E005", "f(...)"),
    ("let m = 1\nlet y = m(2)\n", "m(2)", "E005", "defined at"),
    ('let y = ramp(1, 2, start=3)\n', "start=3", "E004", "once"),
    ('let y = 1 + "a"\n', '1 + "a"', "E005", "arithmetic"),
])
def test_every_error_has_a_hint_that_leads_somewhere(tmp_path, text, needle, code, words):
    p = write_spec(tmp_path, text)
    rc, diags = check_json(p)
    d = errors_of(rc, diags, code)[0]
    line = next(i + 1 for i, s in enumerate(text.split("\n")) if needle.split("\n")[0] in s)
    if "\n" not in needle:
        assert (d["line"], d["col"]) == (line, text.split("\n")[line - 1].index(needle) + 1), d
    assert words in d["hint"], d
    if code == "E002":
        assert "model" not in d["hint"], d  # an unknown function is not a model to declare


@pytest.mark.parametrize("raw, escape", [(b"\r", "\\r"), (b"\x00", "\\u0000")])
def test_raw_control_character_in_string_is_e001(tmp_path, raw, escape):
    p = tmp_path / "spec.fuse"
    p.write_bytes(b'let x = 1\nlet y = "ab' + raw + b'c"\n')
    err = cli_error(["check", str(p)], "E001", (2, 12))
    assert escape in err.split("= hint: ")[1]


def test_a_gradient_with_one_point_per_model_warns_w004(tmp_path):
    """density=[0.5, 0.3] with two experts is a layer gradient, not MergeKit's per-model
    density: W004 at the list; another number of points, or a per-model parameter
    (weights=), or a parameter MergeKit has no per-model form of (scale), does not warn."""
    import re

    spec = tmp_path / "w.fuse"
    spec.write_text('use merging\nmodel base = local("b")\nmodels experts = [local("e0"), local("e1")]\n'
                    'merge t = ties(base, experts, density=[0.5, 0.3])\n'
                    'merge u = ties(base, experts, density=[0.5, 0.3, 0.1])\n'
                    'merge v = task_arithmetic(base, [local("e0"), local("e1")], weights=[0.5, 0.3], scale=[0.2, 1])\n'
                    'save t to "o"\nsave u to "p"\nsave v to "q"\n')
    rc, _, err = run_cli("check", str(spec))
    assert rc == 0, err
    found = re.findall(r"w\.fuse:(\d+):(\d+): warning\[(W\d+)\]", err)
    assert found == [("4", "39", "W004")], err
    assert "a gradient over the layers (first layer to last), not one value per model" in err
