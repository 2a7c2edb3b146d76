"""Golden error tests: tests/golden/errors/NAME.fuse -> expected NAME.err.

`NAME.err` is the exact stderr of `fusionlang check NAME.fuse` (NO_COLOR, run with
tests/golden/errors as the working directory). Refresh with FUSIONLANG_UPDATE_GOLDEN=1,
never by hand; then read the diff critically.

Each .fuse also states what it expects, in comments on the offending line:

    merge a = trim(base, density=1.5)  # expect: E006 col=30 hint=[0, 1]

`expect:` lists the error codes reported on that line; `col=N` the caret column;
`hint=TEXT` that a hint is shown (containing TEXT when given); `msg=TEXT` that the
message contains TEXT. Every reported error must be expected, and every expectation met,
so golden files cannot silently absorb a regression (a lost, duplicated or misplaced
error). The model files the specs name do not exist: these are pure `check` errors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli

GOLDEN = Path(__file__).parent / "golden" / "errors"
REPO = Path(__file__).resolve().parents[1]
UPDATE = os.environ.get("FUSIONLANG_UPDATE_GOLDEN") == "1"
SPECS = sorted(GOLDEN.glob("*.fuse"))

# Golden files whose expectations the implementation does not meet yet. Each is a bug
# (see the reason); the .err file still records today's output, so a change shows up.
KNOWN_BUGS: dict[str, str] = {}

_DIAG = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?P<col>\d+): (?P<sev>error|warning)\[(?P<code>\w+)\]: (?P<msg>.*)$")
_OPT = re.compile(r"\s(col|hint|msg)=")


@dataclass
class Reported:
    file: str
    line: int
    col: int
    code: str
    message: str
    hint: str | None


@dataclass
class Expected:
    line: int
    code: str
    col: int | None = None
    hint: str | None = None  # None: not checked; "": some hint; text: a hint containing it
    msg: str | None = None


def parse_output(text: str) -> list[Reported]:
    """The diagnostics of a rendered report (header line, source, caret, optional hint)."""
    out: list[Reported] = []
    for line in text.splitlines():
        m = _DIAG.match(line)
        if m:
            if m["sev"] == "error":
                out.append(Reported(m["file"], int(m["line"]), int(m["col"]), m["code"], m["msg"], None))
            else:
                out.append(None)  # type: ignore[arg-type]  # a warning: its hint is not ours
        elif line.startswith("  = hint: ") and out and out[-1] is not None:
            out[-1].hint = line[len("  = hint: "):]
    return [r for r in out if r is not None]


def parse_expectations(spec: Path) -> list[Expected]:
    out: list[Expected] = []
    for n, line in enumerate(spec.read_text().splitlines(), 1):
        _, sep, rest = line.partition("# expect:")
        if not sep:
            continue
        parts = _OPT.split(" " + rest)
        codes = parts[0].split()
        opts = dict(zip(parts[1::2], (v.strip() for v in parts[2::2])))
        assert codes and all(re.fullmatch(r"E\d{3}", c) for c in codes), f"{spec.name}:{n}: bad expect comment"
        for c in codes:
            out.append(Expected(n, c, int(opts["col"]) if "col" in opts else None, opts.get("hint"), opts.get("msg")))
    return out


def check(spec: Path) -> tuple[int, str, str]:
    return run_cli("check", spec.name, cwd=GOLDEN)


def normalize(text: str) -> str:
    # NOTE: an absolute path in the output would make the golden depend on the checkout's
    # location; test_expectations flags it as a bug, this keeps the .err files portable.
    return text.replace(str(GOLDEN) + os.sep, "$GOLDEN/").replace(str(REPO) + os.sep, "$REPO/")


def test_golden_files_exist():
    assert len(SPECS) >= 20
    for spec in SPECS:
        assert parse_expectations(spec), f"{spec.name} expects no error"


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_golden_error(spec):
    rc, out, err = check(spec)
    assert "Traceback" not in out + err
    assert rc == 1, f"exit code {rc}\n{err}"
    assert out == ""
    got = normalize(err)
    expected = spec.with_suffix(".err")
    if UPDATE:
        expected.write_text(got)
    assert expected.exists(), f"missing {expected.name}: run with FUSIONLANG_UPDATE_GOLDEN=1"
    assert got == expected.read_text()


def _params():
    for spec in SPECS:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[spec.stem])] if spec.stem in KNOWN_BUGS else []
        yield pytest.param(spec, id=spec.stem, marks=marks)


@pytest.mark.parametrize("spec", list(_params()))
def test_expectations(spec):
    rc, _out, err = check(spec)
    assert rc == 1
    reported = parse_output(err)
    problems: list[str] = []
    for e in parse_expectations(spec):
        cands = [r for r in reported if r.file == spec.name and r.line == e.line and r.code == e.code]
        if not cands:
            problems.append(f"line {e.line}: expected error[{e.code}], not reported")
            continue
        r = next((r for r in cands if e.col is None or r.col == e.col), cands[0])
        reported.remove(r)
        if e.col is not None and r.col != e.col:
            problems.append(f"line {e.line}: error[{e.code}] at column {r.col}, expected {e.col}")
        if e.hint is not None and not r.hint:
            problems.append(f"line {e.line}: error[{e.code}] has no hint")
        elif e.hint and e.hint not in (r.hint or ""):
            problems.append(f"line {e.line}: hint {r.hint!r} does not mention {e.hint!r}")
        if e.msg and e.msg not in r.message:
            problems.append(f"line {e.line}: message {r.message!r} does not mention {e.msg!r}")
    for r in reported:
        problems.append(f"unexpected {r.file}:{r.line}:{r.col}: error[{r.code}]: {r.message}")
    n = len(parse_output(err))
    if f"\n{n} error{'s' * (n != 1)}\n" not in err:
        problems.append(f"the summary does not say {n} error(s)")
    if str(REPO) in err or str(GOLDEN) in err:
        problems.append("the output contains an absolute path of this machine")
    assert not problems, "\n".join(problems) + "\n\n" + err
