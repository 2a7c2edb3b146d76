#!/usr/bin/env bash
# Build the tiny zoo, run every example YAML with MergeKit, and check the outputs
# against the formulas in docs/mergekit-semantics.md.
#   bash bench/mergekit_examples/run_examples.sh [WORK_DIR]   (default /tmp/mergekit-examples)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="${1:-/tmp/mergekit-examples}"
PY="${PY:-$REPO/.venv/bin/python}"
MK="${MERGEKIT_YAML:-$REPO/.venv-mergekit/bin/mergekit-yaml}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$WORK/out"
[ -d "$WORK/zoo/expert_3" ] || "$PY" "$HERE/make_tiny_zoo.py" "$WORK/zoo"
cd "$WORK/zoo"
for f in "$HERE"/*.yml; do
    n="$(basename "$f" .yml)"
    rm -rf "$WORK/out/$n"
    "$MK" "$f" "$WORK/out/$n" --random-seed 0 --no-copy-tokenizer --quiet >"$WORK/out/$n.log" 2>&1 \
        || { echo "FAILED: $n"; tail -5 "$WORK/out/$n.log"; exit 1; }
    echo "ran $n"
done
"$PY" "$HERE/check_semantics.py" "$WORK/zoo" "$WORK/out"
