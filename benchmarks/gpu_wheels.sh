#!/usr/bin/env bash
# Download, on this (CPU) machine, the wheels the GPU machine lacks into .whl/ (git-ignored), for
# `device` runs with carry [".whl"]: the image has torch/triton/transformers but no pydantic or deepspeed
# and cannot reach a package index. Python 3.12, x86-64 manylinux, as the image.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
         --platform manylinux2014_x86_64 -d .whl "$@"; }
dl pydantic==2.13.4 pydantic_core==2.46.4 annotated_types==0.7.0 typing_inspection==0.4.2 \
   typing_extensions==4.16.0 hjson==3.1.0 badam==1.4 torchao==0.18.0
# DeepSpeed has no wheel on the index: build its pure-Python one (no compiled ops).
[ -n "$(ls .whl/deepspeed-*.whl 2>/dev/null)" ] || DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
du -sh .whl && ls .whl
