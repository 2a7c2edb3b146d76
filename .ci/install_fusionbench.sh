#!/usr/bin/env bash
# Install FusionBench (from PyPI) into its own virtual environment, for the conformance
# tests of the data-dependent methods (tests/test_fusionbench_conformance.py) and the
# benchmark (bench/).
#
# Usage: bash .ci/install_fusionbench.sh [VENV_DIR]   (default: <repo>/.venv-fusionbench)
#
# NOTE: a separate venv because fusion-bench pins hydra, lightning, transformers and more
# that we do not want resolved against fusionlang's own environment.
# NOTE: torch==2.13.0 is installed first and pinned again in the same pip command, so pip
# never resolves fusion-bench's torch requirement to a (multi-GB) CUDA build.
# Idempotent: re-running with fusion_bench already importable is a fast no-op.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-fusionbench}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
FUSIONBENCH_SPEC="${FUSIONBENCH_SPEC:-fusion-bench==0.2.33}"
PYTHON="${PYTHON:-python3}"

if "$VENV/bin/python" - "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys, torch, fusion_bench  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
PY
then
    echo "fusion-bench already installed in $VENV"
else
    if ! "$VENV/bin/python" -c "" 2>/dev/null; then
        "$PYTHON" -m venv --clear "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" "$FUSIONBENCH_SPEC"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
"$VENV/bin/python" -c 'import importlib.metadata as m, torch, fusion_bench; print("fusion-bench", m.version("fusion-bench"), "torch", torch.__version__)'
