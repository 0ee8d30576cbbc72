#!/usr/bin/env bash
# The device check's peers as wheels in .whl/ (git-ignored), for a GPU machine without internet:
# flash-linear-attention (pure Python on torch + triton) and tokamax with its pure-Python
# dependencies. No dependencies are resolved: the GPU machine brings jax, torch and numpy.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps -d .whl fla-core==0.6.0 tokamax==0.0.12 einshape \
  immutabledict jaxtyping wadler-lindig qwix typeguard
ls -l .whl
