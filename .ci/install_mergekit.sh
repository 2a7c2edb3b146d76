#!/usr/bin/env bash
# Install MergeKit (from PyPI) into its own virtual environment, for the benchmark
# (bench/run_bench.py) and the MergeKit conformance tests.
#
# Usage: bash .ci/install_mergekit.sh [VENV_DIR]    (default: <repo>/.venv-mergekit)
#
# NOTE: a separate venv because mergekit pins many things (transformers<6, accelerate,
# peft, datasets, pydantic<3, click<9, ...) that we do not want to drag into, or have
# resolved against, fusionlang's own environment.
# NOTE: torch==2.13.0 is installed first and pinned again in the same pip command as
# mergekit, so pip never resolves `torch>=2.0.0` to a (multi-GB) CUDA build.
# Idempotent: re-running with mergekit already importable is a fast no-op.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-mergekit}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_SPEC="${MERGEKIT_SPEC:-mergekit==0.1.5}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/mergekit-yaml" ] && "$VENV/bin/python" - "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys, torch, mergekit  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
PY
then
    echo "mergekit already installed in $VENV"
else
    if ! "$VENV/bin/python" -c "" 2>/dev/null; then
        # absent, or its interpreter is gone (e.g. the Python it was made with was removed)
        "$PYTHON" -m venv --clear "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" "$MERGEKIT_SPEC"
fi

# Offline from the hub: never let transformers / huggingface_hub phone home.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
"$VENV/bin/mergekit-yaml" --help >/dev/null
"$VENV/bin/python" -c 'import importlib.metadata as m, torch; print("mergekit", m.version("mergekit"), "torch", torch.__version__)'
echo "mergekit-yaml: $VENV/bin/mergekit-yaml"
