#!/usr/bin/env bash
# Set up everything dfmpc-fx needs on a fresh machine: the Fashion-MNIST data (Debian package),
# a virtual environment in .venv, and the package with its dev extras (torch comes from pip's
# local wheel cache under the machine's constraint file: torch==2.14.1, torchvision==0.29.1).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints/ci.txt -e ".[dev]"
# facenet-pytorch (MTCNN, weights in the wheel) pins torch<2.3: without its dependencies, which
# the line above already installed
.venv/bin/python -m pip install -q --no-deps facenet-pytorch==2.6.0
.venv/bin/python -c "import torch, torchvision, lightning, mlflow, dfmpc_fx; print('dfmpc-fx', dfmpc_fx.__version__, 'torch', torch.__version__, 'ready')"
