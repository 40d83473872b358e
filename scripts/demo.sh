#!/usr/bin/env bash
# The main job of README's quick start.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/densenet analyze densenet121-cifar
