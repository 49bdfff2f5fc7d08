#!/usr/bin/env bash
# Packs what bench/gpu_train_step.py needs on a GPU machine that cannot reach any network into
# .device/ (git-ignored, under 64 MiB together with the repo):
#   .device/ComfyUI.tar.gz  the ComfyUI checkout the tests use, without its tokenizer data and
#                           API nodes (the benchmark builds its UNet from random weights);
#   .device/wheels/         Python 3.12 x86-64 wheels of what ComfyUI and the benchmark import
#                           and that machine's image lacks (its package list is in the device
#                           tool's KINDS.md: torch, transformers, peft, ... are already there).
# BENCHMARKS.md shows the command that installs them there and runs the benchmark.
#
#     COMFYUI_PATH=~/comfyui-hosts/ComfyUI-0.33.0 bench/device_bundle.sh   # the primary host
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
comfyui=${COMFYUI_PATH:-$HOME/ComfyUI}
bundle=$root/.device
[ -f "$comfyui/comfy/model_patcher.py" ] || { echo "no ComfyUI checkout at $comfyui: set COMFYUI_PATH" >&2; exit 1; }

wheels=(
  diffusers==0.42.1 importlib_metadata==10.2.0                     # the reference recipe
  av==18.1.0 kornia==0.9.0 kornia_rs==0.2.0 spandrel==0.4.2         # imported when ComfyUI starts
  torchsde==0.2.6 trampoline==0.1.2
  pydantic==2.13.4 pydantic_core==2.46.4 pydantic-settings==2.14.1
  python-dotenv==1.2.2 annotated-types==0.7.0 typing-inspection==0.4.2 typing_extensions==4.16.0
  comfy-aimdo==0.4.13 comfy-kitchen==0.2.31 blake3==1.0.11 simpleeval==1.0.8   # new in ComfyUI 0.33
)

rm -rf "$bundle"
mkdir -p "$bundle/wheels"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$bundle/wheels" "${wheels[@]}"
tar -czf "$bundle/ComfyUI.tar.gz" -C "$comfyui" --exclude=./.git --exclude=./comfy/sd1_tokenizer \
  --exclude='./comfy/text_encoders/*_tokenizer' --exclude=./comfy_api_nodes --exclude=./tests --exclude=./tests-unit \
  --exclude='__pycache__' .
du -sh "$bundle"
