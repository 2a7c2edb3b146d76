#!/usr/bin/env bash
# Here, before a device run (not on the GPU machine, which reaches no package registry):
# the Python 3.12 wheels of what fusionlang imports and the nvidia-h200 image lacks
# (/work/.library/device/KINDS.md lists what it has), into .whl/ (git-ignored via
# .git/info/exclude). bench/gpu_check.sh installs them there. ~5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
# pydantic with the pydantic-core it pins; the rest without their dependencies (the image has them)
python3 -m pip download -q "${plat[@]}" pydantic
python3 -m pip download -q --no-deps "${plat[@]}" lark datasets dill multiprocess
rm -f .whl/typing_extensions-*.whl  # the image's own
ls .whl && du -sh .whl
