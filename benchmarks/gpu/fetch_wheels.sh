#!/usr/bin/env bash
# The device check's peers as wheels in .whl/ (git-ignored), for a GPU machine without internet
# (Python 3.12, x86-64): flash-linear-attention (pure Python on torch + triton) and tokamax with
# the dependencies that machine lacks. jax, torch, numpy and absl come with the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --only-binary=:all:"
python3 -m pip download -q --no-deps $PY -d .whl fla-core==0.6.0 tokamax==0.0.12 einshape \
  immutabledict jaxtyping wadler-lindig qwix typeguard==2.13.3 pydantic pydantic-core \
  annotated-types typing-inspection typing-extensions tensorboardx
ls -l .whl
