"""Reading model directories: what is read (as transformers reads it) and what is refused.

Each refusal is checked against the project contract (located `file:line:col: error[EXXX]`
at the model's `local(...)`, the file and tensor named, a hint, exit 1, nothing written),
and each safetensors verdict against the `safetensors` library's own on the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, write_spec
from safetensors.torch import load_file, save_file

from fusionlang.runtime.sources import SourceError, read_model_dir, read_safetensors_header

_HEAD = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): error\[(?P<code>\w+)\]: (?P<msg>.*)$")


# ---------------------------------------------------------------------- helpers
def st_bytes(header: dict | bytes, data: bytes) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's header with `edit(header)`, keeping its data bytes."""
    header, data = read_header(path)
    edit(header)
    path.write_bytes(st_bytes(header, data))


def expect_error(res, code: str, spec_path: Path, at: tuple[int, int], *names: str, outputs=()) -> dict:
    """The contract for one located error; returns the diagnostic (msg, hint)."""
    rc, out, err = res
    assert "Traceback" not in out + err, out + err
    assert rc == 1, f"exit {rc}\n{out}{err}"
    m = _HEAD.search("\n".join(line for line in err.splitlines() if "error[" in line))
    assert m, err
    assert (m["file"], m["code"], int(m["line"]), int(m["col"])) == (str(spec_path), code, *at), err
    hint = re.search(r"^  = hint: (.+)$", err, re.MULTILINE)
    assert hint and hint.group(1).strip(), f"no hint\n{err}"
    for n in names:
        assert n in m["msg"], f"{n!r} not named in {m['msg']!r}"
    for o in outputs:
        assert not Path(o).exists(), f"partial output left behind: {o}"
    return {"msg": m["msg"], "hint": hint.group(1)}


def copy(fam: dict[str, Path], dst: Path, keys=("base", "e0")) -> dict[str, Path]:
    out = {}
    for k in keys:
        out[k] = dst / k
        shutil.copytree(fam[k], out[k])
    return out


TA = """use merging
model base = local("{base}")
models experts = [local("{e0}")]
merge m = task_arithmetic(base, experts, scale=0.5)
save m to "out/m"
"""
AT_BASE, AT_E0 = (2, 14), (3, 19)  # the local( of base / of the expert in TA


def ta_spec(tmp_path: Path, fam: dict[str, Path]) -> Path:
    return write_spec(tmp_path, TA.format(base=fam["base"], e0=fam["e0"]))


def torch_ta(base: dict, e0: dict) -> dict:
    return {k: base[k].float() + 0.5 * (e0[k].float() - base[k].float()) for k in base}


# ------------------------------------------- 1. safetensors headers: the library's verdict
A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}
DATA = bytes(range(16))


def _ok(**extra):
    return {"a": A, "b": B, **extra}


# name -> (file bytes, tensor the message must name or None)
HEADERS = {
    "valid": (st_bytes(_ok(), DATA), None),
    "valid_metadata": (st_bytes(_ok(__metadata__={"format": "pt"}), DATA), None),
    "valid_metadata_null": (st_bytes(_ok(__metadata__=None), DATA), None),
    "valid_empty_tensor_last": (st_bytes(_ok(z={"dtype": "F32", "shape": [0, 3], "data_offsets": [16, 16]}), DATA), None),
    "valid_fp8": (st_bytes({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]},
                            "b": {"dtype": "F8_E5M2", "shape": [4], "data_offsets": [4, 8]}}, DATA[:8]), None),
    "valid_trailing_spaces": (st_bytes(json.dumps(_ok()).encode() + b"    ", DATA), None),
    "overlap": (st_bytes({"a": A, "b": {**B, "data_offsets": [0, 8]}, "c": {**A, "data_offsets": [8, 16]}}, DATA), "'a'"),
    "negative_offset": (st_bytes({"a": {**A, "data_offsets": [-8, 0]}, "b": {**B, "data_offsets": [0, 8]}}, DATA[:8]), "'a'"),
    "offset_past_end": (st_bytes({"a": A, "b": {**B, "data_offsets": [8, 16]}}, DATA[:12]), "'b'"),
    "gap": (st_bytes({"a": A, "b": {**B, "data_offsets": [12, 20]}}, DATA + bytes(4)), "'b'"),
    "trailing_bytes": (st_bytes(_ok(), DATA + b"XXXXXXXX"), "'b'"),
    "reversed_offsets": (st_bytes({"a": {**A, "data_offsets": [8, 0]}, "b": B}, DATA), "'a'"),
    "size_mismatch": (st_bytes({"a": {**A, "shape": [3]}, "b": B}, DATA), "'a'"),
    "unknown_dtype": (st_bytes({"a": {**A, "dtype": "F33"}, "b": B}, DATA), "'a'"),
    "dtype_not_string": (st_bytes({"a": {**A, "dtype": 4}, "b": B}, DATA), "'a'"),
    "shape_float": (st_bytes({"a": {**A, "shape": [2.0]}, "b": B}, DATA), "'a'"),
    "shape_negative": (st_bytes({"a": {**A, "shape": [-2]}, "b": B}, DATA), "'a'"),
    "shape_not_list": (st_bytes({"a": {**A, "shape": 2}, "b": B}, DATA), "'a'"),
    "offsets_three": (st_bytes({"a": {**A, "data_offsets": [0, 8, 8]}, "b": B}, DATA), "'a'"),
    "offsets_bool": (st_bytes({"a": {**A, "data_offsets": [False, 8]}, "b": B}, DATA), "'a'"),
    "entry_missing_dtype": (st_bytes({"a": {"shape": [2], "data_offsets": [0, 8]}, "b": B}, DATA), "'a'"),
    "entry_not_object": (st_bytes({"a": [1, 2], "b": {**B, "data_offsets": [0, 8]}}, DATA[:8]), "'a'"),
    "header_beyond_file": (struct.pack("<Q", 10_000) + json.dumps(_ok()).encode() + DATA, None),
    "header_huge_length": (struct.pack("<Q", 2**63) + json.dumps(_ok()).encode() + DATA, None),
    "header_not_json": (st_bytes(b"not json at all!", DATA), None),
    "header_not_utf8": (st_bytes(b'{"\xff": 1}', DATA), None),
    "header_list": (st_bytes(b"[1, 2, 3]", DATA), None),
    "header_nul_padding": (st_bytes(json.dumps(_ok()).encode() + b"\0\0", DATA), None),
    "metadata_not_strings": (st_bytes(_ok(__metadata__={"format": 1}), DATA), None),
    "metadata_list": (st_bytes(_ok(__metadata__=["pt"]), DATA), None),
    "empty_file": (b"", None),
    "seven_bytes": (b"\x10\0\0\0\0\0\0", None),
}


def _library_refuses(path: Path) -> bool:
    try:
        load_file(path)
    except Exception:  # noqa: BLE001 - any refusal of the library counts
        return True
    return False


@pytest.mark.parametrize("case", list(HEADERS))
def test_header_verdict_is_the_safetensors_librarys(tmp_path, case):
    raw, tensor = HEADERS[case]
    f = tmp_path / "model.safetensors"
    f.write_bytes(raw)
    refused = _library_refuses(f)
    assert refused == (not case.startswith("valid")), "the case table is wrong about the library"
    try:
        infos = read_safetensors_header(f)
    except SourceError as e:
        assert refused, f"fusionlang refuses a file safetensors loads: {e.message}"
        assert e.code == "E011" and str(f) in e.message and e.hint
        if tensor:
            assert f"tensor {tensor}" in e.message, e.message
        return
    assert not refused, "fusionlang accepts a file safetensors refuses"
    # what is accepted is read as the library reads it
    lib = load_file(f)
    assert {k: (tuple(v.shape)) for k, v in lib.items()} == {k: i.shape for k, i in infos.items()}


def test_unsupported_dtype_is_refused_by_name(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(st_bytes({"a": A, "u": {"dtype": "U16", "shape": [4], "data_offsets": [8, 16]}}, DATA))
    assert not _library_refuses(f)  # a valid file, of a dtype fusionlang does not compute with
    with pytest.raises(SourceError) as e:
        read_safetensors_header(f)
    assert e.value.code == "E011" and "'u'" in e.value.message and "U16" in e.value.message and e.value.hint


@pytest.mark.parametrize("how", ["overlap", "negative"])
@pytest.mark.parametrize("cmd", ["check", "run"])
def test_corrupt_offsets_are_located_errors(tmp_path, llama, how, cmd):
    """Case 09: edited data_offsets (o_proj's bytes under q_proj's name; 128 bytes of header
    text as a norm weight) were merged silently with exit 0."""
    fam = copy(llama, tmp_path / "models")
    f = fam["e0"] / "model.safetensors"
    q, o, norm = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                  "model.layers.0.input_layernorm.weight")

    def overlap(h):
        h[q]["data_offsets"] = list(h[o]["data_offsets"])

    def negative(h):
        h[norm]["data_offsets"] = [-128, 0]

    edit_header(f, overlap if how == "overlap" else negative)
    assert _library_refuses(f)
    p = ta_spec(tmp_path, fam)
    args = ("run", str(p), "-q") if cmd == "run" else ("check", str(p))
    d = expect_error(run_cli(*args), "E011", p, AT_E0, str(f), outputs=(tmp_path / "out/m",))
    assert (q in d["msg"] or o in d["msg"]) if how == "overlap" else norm in d["msg"], d["msg"]


# ------------------------------------------------------ non-regular files never block
def test_fifo_named_model_safetensors_does_not_block(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    f = fam["e0"] / "model.safetensors"
    f.unlink()
    os.mkfifo(f)
    p = ta_spec(tmp_path, fam)
    # NOTE: a subprocess with a timeout: opening the FIFO would block forever
    r = subprocess.run([sys.executable, "-m", "fusionlang", "check", str(p)], check=False, capture_output=True,
                       text=True, timeout=120, cwd=REPO, env={**os.environ, "NO_COLOR": "1"})
    d = expect_error((r.returncode, r.stdout, r.stderr), "E011", p, AT_E0, str(f))
    assert "named pipe" in d["msg"]


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_non_regular_model_file_is_refused(tmp_path, llama, kind):
    fam = copy(llama, tmp_path / "models")
    f = fam["e0"] / "model.safetensors"
    f.unlink()
    if kind == "directory":
        f.mkdir()
    else:
        os.symlink("/dev/zero", f)  # an endless character device behind a link
    p = ta_spec(tmp_path, fam)
    d = expect_error(run_cli("check", str(p)), "E011", p, AT_E0, str(f))
    assert ("a directory" if kind == "directory" else "character device") in d["msg"]


# ------------------------------------------------------------------ 2. fp8 checkpoints
def fp8_model(src: Path, dst: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`src` with every 2-D weight stored as `dtype` (norms stay fp32), as fp8 releases."""
    shutil.copytree(src, dst)
    sd = {k: (v.to(dtype) if v.ndim == 2 else v).contiguous() for k, v in load_file(src / "model.safetensors").items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return sd


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_inputs_merge_in_float32_and_keep_their_dtype(tmp_path, llama, dtype):
    """Case 06: F8_E4M3 inputs were called corrupt by `run` (after `check` said ok)."""
    a = fp8_model(llama["base"], tmp_path / "models/a", dtype)
    b = fp8_model(llama["e0"], tmp_path / "models/b", dtype)
    p = write_spec(tmp_path, 'use merging\nmodel a = local("models/a")\nmodel b = local("models/b")\n'
                   "merge soup = average([a, b])\nmerge soup16 = average([a, b])\n"
                   'save soup to "out/soup"\nsave soup16 to "out/soup16" as bf16\n')
    rc, out, err = run_cli("run", str(p), "-q", "--device", "cpu")
    assert rc == 0, out + err
    soup, soup16 = load_file(tmp_path / "out/soup/model.safetensors"), load_file(tmp_path / "out/soup16/model.safetensors")
    assert soup.keys() == a.keys() == soup16.keys()
    for k in a:
        mean = (a[k].float() + b[k].float()) / 2
        assert soup[k].dtype == a[k].dtype, k
        assert torch.equal(soup[k].float(), mean.to(a[k].dtype).float()), k
        assert soup16[k].dtype == torch.bfloat16 and torch.equal(soup16[k], mean.to(torch.bfloat16)), k
    assert any(v.dtype == dtype for v in soup.values())


def test_block_scaled_fp8_is_refused(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    f = fam["e0"] / "model.safetensors"
    sd = load_file(f)
    w = "model.layers.0.mlp.up_proj.weight"
    sd[w] = sd[w].to(torch.float8_e4m3fn)
    sd[w + "_scale_inv"] = torch.ones(1, 1)
    save_file(sd, f, metadata={"format": "pt"})
    p = ta_spec(tmp_path, fam)
    d = expect_error(run_cli("check", str(p)), "E011", p, AT_E0, "block-scaled fp8", w + "_scale_inv")
    assert "not supported" in d["msg"]


def test_quantization_config_is_refused(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    cfg = json.loads((fam["e0"] / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (fam["e0"] / "config.json").write_text(json.dumps(cfg))
    p = ta_spec(tmp_path, fam)
    expect_error(run_cli("check", str(p)), "E011", p, AT_E0, "quantization_config", "fp8")


# ------------------------------------------- 3. the files transformers reads, no others
def _from_pretrained_state(d: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(d).state_dict().items()}


def test_stale_index_next_to_model_safetensors_is_ignored(tmp_path, llama):
    """Case 07: save_pretrained leaves an old index behind; transformers loads
    model.safetensors and never opens it; fusionlang refused the folder."""
    fam = copy(llama, tmp_path / "models")
    stale = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors"
                                            for k in load_file(fam["e0"] / "model.safetensors")}}
    (fam["e0"] / "model.safetensors.index.json").write_text(json.dumps(stale))
    p = ta_spec(tmp_path, fam)
    rc, out, err = run_cli("run", str(p), "-q")
    assert rc == 0, out + err
    got = load_file(tmp_path / "out/m/model.safetensors")
    want = torch_ta(load_file(fam["base"] / "model.safetensors"), _from_pretrained_state(fam["e0"]))
    assert got.keys() == want.keys()
    assert all((got[k] - want[k]).abs().max() < 1e-6 for k in want)


def test_index_without_model_safetensors_and_missing_shard(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    f = fam["e0"] / "model.safetensors"
    keys = sorted(load_file(f))
    save_file({k: v for k, v in load_file(f).items() if k in keys[:5]}, fam["e0"] / "model-00001-of-00002.safetensors")
    (fam["e0"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors" for i, k in enumerate(keys)}}))
    f.unlink()
    p = ta_spec(tmp_path, fam)
    expect_error(run_cli("check", str(p)), "E011", p, AT_E0, "model-00002-of-00002.safetensors")


def test_stray_safetensors_are_not_merged(tmp_path, llama):
    """An adapter or leftover *.safetensors next to model.safetensors is not part of the
    model transformers loads: its tensors (extra names, other values) stay out."""
    fam = copy(llama, tmp_path / "models")
    sd = load_file(fam["e0"] / "model.safetensors")
    save_file({k: v * 100 for k, v in sd.items()}, fam["e0"] / "training_leftover.safetensors")
    save_file({"base_model.model.lora_A.weight": torch.ones(2, 2)}, fam["e0"] / "adapter_model.safetensors")
    p = ta_spec(tmp_path, fam)
    rc, out, err = run_cli("run", str(p), "-q")
    assert rc == 0, out + err
    got = load_file(tmp_path / "out/m/model.safetensors")
    want = torch_ta(load_file(fam["base"] / "model.safetensors"), _from_pretrained_state(fam["e0"]))
    assert got.keys() == want.keys()
    assert all((got[k] - want[k]).abs().max() < 1e-6 for k in want)


def test_only_unrelated_safetensors_is_e011_naming_them(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    (fam["e0"] / "model.safetensors").rename(fam["e0"] / "adapter_model.safetensors")
    p = ta_spec(tmp_path, fam)
    d = expect_error(run_cli("run", str(p), "-q"), "E011", p, AT_E0, "adapter_model.safetensors",
                     outputs=(tmp_path / "out/m",))
    assert "model.safetensors" in d["hint"]
    # the directory is there but unusable: `check` reports it (an absent model would be 'not verified')
    expect_error(run_cli("check", str(p)), "E011", p, AT_E0, "adapter_model.safetensors")


# ------------------------------------------------- 4. config.json and index JSON files
CONFIGS = {
    "not_utf8": b'{"model_type": "\xff\xfe"}',
    "not_json": b"{model_type: llama}",
    "truncated": b'{"model_type": "llama", "hidden',
    "empty": b"",
    "list": b'["llama"]',
    "string": b'"llama"',
}


@pytest.mark.parametrize("how", list(CONFIGS))
def test_bad_config_json_is_located_e011(tmp_path, llama, how):
    fam = copy(llama, tmp_path / "models")
    (fam["e0"] / "config.json").write_bytes(CONFIGS[how])
    p = ta_spec(tmp_path, fam)
    expect_error(run_cli("check", str(p)), "E011", p, AT_E0, str(fam["e0"] / "config.json"))


def test_config_json_directory_is_located_e011(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    (fam["e0"] / "config.json").unlink()
    (fam["e0"] / "config.json").mkdir()
    p = ta_spec(tmp_path, fam)
    expect_error(run_cli("check", str(p)), "E011", p, AT_E0, "config.json", "directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_is_located_e011(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    (fam["e0"] / "config.json").chmod(0)
    p = ta_spec(tmp_path, fam)
    d = expect_error(run_cli("check", str(p)), "E011", p, AT_E0, "config.json")
    assert "permission" in (d["msg"] + d["hint"]).lower()


INDEXES = {
    "not_json": (b"{weight_map", "not valid JSON"),
    "not_utf8": (b'{"weight_map": {"\xff": "a"}}', "UTF-8"),
    "list": (b"[]", "JSON list"),
    "no_weight_map": (b'{"metadata": {}}', "weight_map"),
    "weight_map_list": (b'{"weight_map": ["model-00001-of-00002.safetensors"]}', "weight_map"),
    "value_not_string": (b'{"weight_map": {"lm_head.weight": 3}}', "lm_head.weight"),
    "escapes_directory": (b'{"weight_map": {"lm_head.weight": "../base/model.safetensors"}}', "outside"),
    "absolute_path": (b'{"weight_map": {"lm_head.weight": "/etc/passwd"}}', "outside"),
    "dotdot_inside": (b'{"weight_map": {"lm_head.weight": "sub/../../x.safetensors"}}', "outside"),
}


@pytest.mark.parametrize("how", list(INDEXES))
def test_bad_index_is_located_e011(tmp_path, llama, how):
    fam = copy(llama, tmp_path / "models")
    (fam["e0"] / "model.safetensors").rename(fam["e0"] / "model-00001-of-00001.safetensors")
    raw, says = INDEXES[how]
    (fam["e0"] / "model.safetensors.index.json").write_bytes(raw)
    p = ta_spec(tmp_path, fam)
    expect_error(run_cli("check", str(p)), "E011", p, AT_E0, "model.safetensors.index.json", says)


def test_index_naming_the_wrong_shard_is_e011(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    f = fam["e0"] / "model.safetensors"
    sd = load_file(f)
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:5]}, fam["e0"] / "s1.safetensors")
    save_file({k: sd[k] for k in keys[5:]}, fam["e0"] / "s2.safetensors")
    f.unlink()
    (fam["e0"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "s1.safetensors" for k in keys}}))
    p = ta_spec(tmp_path, fam)
    expect_error(run_cli("check", str(p)), "E011", p, AT_E0, keys[5], "s1.safetensors")


def test_sharded_index_reads_as_transformers(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    f = fam["e0"] / "model.safetensors"
    sd = load_file(f)
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:5]}, fam["e0"] / "s1.safetensors", metadata={"format": "pt"})
    save_file({k: sd[k] for k in keys[5:]}, fam["e0"] / "s2.safetensors", metadata={"format": "pt"})
    f.unlink()
    (fam["e0"] / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: ("s1.safetensors" if i < 5 else "s2.safetensors") for i, k in enumerate(keys)}}))
    h = read_model_dir(fam["e0"])
    assert {k: i.shape for k, i in h.tensors.items()} == {k: tuple(v.shape) for k, v in _from_pretrained_state(fam["e0"]).items()}


# ------------------------------------------------ 5. the output's config.json
def test_reference_without_config_takes_another_inputs(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    (fam["base"] / "config.json").unlink()
    p = ta_spec(tmp_path, fam)
    rc, out, err = run_cli("run", str(p), "-q")
    assert rc == 0, out + err
    cfg, src = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "out/m", fam["e0"]))
    assert cfg["model_type"] == src["model_type"] and cfg["num_hidden_layers"] == src["num_hidden_layers"]
    got = _from_pretrained_state(tmp_path / "out/m")  # the output loads
    want = torch_ta(load_file(fam["base"] / "model.safetensors"), load_file(fam["e0"] / "model.safetensors"))
    assert all((got[k] - want[k]).abs().max() < 1e-6 for k in want)


def test_no_input_with_config_is_located_error(tmp_path, llama):
    fam = copy(llama, tmp_path / "models")
    for k in fam:
        (fam[k] / "config.json").unlink()
    p = ta_spec(tmp_path, fam)
    d = expect_error(run_cli("check", str(p)), "E011", p, AT_BASE, "config.json", outputs=(tmp_path / "out/m",))
    assert "transformers" in d["msg"] and "config.json" in d["hint"]


def test_fp8_e4m3_overflow_is_an_error_not_saturation(tmp_path, llama):
    """torch saturates float32 -> float8_e4m3fn at ±448 (no inf): a merge whose values
    leave that range must not be written as 448 silently."""
    fp8_model(llama["base"], tmp_path / "models/a", torch.float8_e4m3fn)
    fp8_model(llama["e0"], tmp_path / "models/b", torch.float8_e4m3fn)
    assert torch.tensor([1000.0]).to(torch.float8_e4m3fn).item() == 448  # what would be written
    p = write_spec(tmp_path, 'model a = local("models/a")\nmodel b = local("models/b")\n'
                   'merge m = 100000 * (b - a)\nsave m to "out/m"\n')
    d = expect_error(run_cli("run", str(p), "-q", "--device", "cpu"), "E030", p, (4, 11), "F8_E4M3",
                     outputs=(tmp_path / "out/m",))
    assert "448" in d["msg"]


# ------------------------------------------------------------ the Hugging Face cache
def _fake_cache(root: Path, src: Path, ref_bytes: bytes) -> None:
    repo_dir = root / "models--org--ft"
    shutil.copytree(src, repo_dir / "snapshots" / "3f2a1c0ffee")
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_bytes(ref_bytes)


def test_hf_revision_cannot_leave_the_cache(tmp_path, llama, monkeypatch):
    _fake_cache(tmp_path / "hub", llama["e0"], b"3f2a1c0ffee")
    (tmp_path / "hub" / "outside").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    p = write_spec(tmp_path, 'model a = hf("org/ft", revision="../../outside")\nmerge m = a * 1\nsave m to "out/m"\n')
    expect_error(run_cli("check", str(p)), "E006", p, (1, 11), "../../outside")


def test_hf_damaged_ref_is_an_error_not_a_traceback(tmp_path, llama, monkeypatch):
    _fake_cache(tmp_path / "hub", llama["e0"], b"\xff\xfe not utf-8")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    p = write_spec(tmp_path, 'model a = hf("org/ft")\nmerge m = a * 1\nsave m to "out/m"\n')
    expect_error(run_cli("compile", str(p)), "E017", p, (1, 11), "refs/main")
