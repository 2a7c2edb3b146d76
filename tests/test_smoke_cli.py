from conftest import load_state, run_cli, write_spec


def test_task_arithmetic_end_to_end(llama, tmp_path):
    spec = write_spec(tmp_path, f'''use merging
model base = local("{llama['base']}")
models experts = [local("{llama['e0']}"), local("{llama['e1']}")]
merge ta = task_arithmetic(base, experts, scale=0.5)
save ta to "out/ta"
''')
    rc, _out, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    got = load_state(tmp_path / "out/ta")
    b, e0, e1 = (load_state(llama[k]) for k in ("base", "e0", "e1"))
    for k in b:
        ref = b[k] + 0.5 * ((e0[k] - b[k]) + (e1[k] - b[k]))
        assert (got[k] - ref).abs().max() < 1e-6, k


def test_every_option_has_help():
    """`--help` describes every option and argument of every command."""
    import argparse

    from fusionlang.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)) and not a.help:
                missing.append(f"{path}: {'/'.join(a.option_strings) or a.dest}")

    walk(build_parser(), "fusionlang")
    assert missing == []


def test_every_package_ships_in_the_wheel():
    """pyproject.toml lists the packages explicitly (grammar/ and stdlib/ are mapped in):
    every package directory of fusionlang/ must be listed, or `pip install .` installs a
    fusionlang that cannot import itself."""
    import pytest

    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "fusionlang").rglob("__init__.py")}
    assert found - listed == set()
