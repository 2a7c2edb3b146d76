"""OpenMP's wait settings (runtime/openmp.py): the CLI sets a short spin before torch
loads libgomp, and a user's own setting is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fusionlang.runtime.openmp import SPIN_COUNT, set_wait_policy

PROBE = "import fusionlang.cli, torch; torch.ones(1 << 16).add_(1)"  # libgomp prints its settings when loaded


def libgomp_settings(**env: str) -> dict[str, str]:
    """The settings libgomp reports (OMP_DISPLAY_ENV=VERBOSE) in a fresh process that
    imports the CLI, then torch."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", PROBE], env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env},
                       capture_output=True, text=True, check=True)
    out = {}
    for line in (r.stdout + r.stderr).splitlines():
        key, eq, value = line.strip().partition(" = ")
        if eq and key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            out[key] = value.strip("'")
    if not out:
        pytest.skip("this torch's OpenMP runtime is not libgomp (no OMP_DISPLAY_ENV report)")
    return out


def test_the_cli_sets_a_short_spin_before_torch_loads_openmp():
    assert libgomp_settings() == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": SPIN_COUNT}


def test_a_users_own_setting_is_kept_whole():
    active = libgomp_settings(OMP_WAIT_POLICY="ACTIVE")
    assert active["OMP_WAIT_POLICY"] == "ACTIVE" and active["GOMP_SPINCOUNT"] != SPIN_COUNT
    assert libgomp_settings(GOMP_SPINCOUNT="123")["GOMP_SPINCOUNT"] == "123"
    env = {"GOMP_SPINCOUNT": "0"}
    set_wait_policy(env)
    assert env == {"GOMP_SPINCOUNT": "0"}
    env = {}
    set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": SPIN_COUNT}
