#!/usr/bin/env bash
# Create .venv and install the toolkit with its test and demo extras.
# The PyTorch build is pinned here, not in pyproject.toml: on a GPU machine, set TORCH_PACKAGES to the
# build that matches your CUDA (for example TORCH_PACKAGES="torch torchvision") before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PACKAGES=${TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet $TORCH_PACKAGES
# Keep the torch build just installed: other packages may not replace it.
.venv/bin/python -m pip freeze | grep -iE '^(torch|torchvision)==' > .venv/torch-constraints.txt
.venv/bin/python -m pip install --quiet -c .venv/torch-constraints.txt -e ".[tests,demo]"
.venv/bin/python -c "import torch, diffusers, distill; print('installed: torch', torch.__version__, '| diffusers', diffusers.__version__)"
