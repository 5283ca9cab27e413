#!/usr/bin/env bash
# Create .venv and install onnxaom into it.
#   scripts/setup.sh core   the library and its CLI (enough for `onnxaom demo`)
#   scripts/setup.sh dev    + torch adapter, test tools, and the Debian packages the tests use
#                           (chromium, chromium-driver, dataset-fashion-mnist)
# torch: where no NVIDIA GPU is present, a CPU build: 2.13.0 where pip finds that wheel on local
# disk (this machine image), else the newest from PyTorch's CPU index; with a GPU the default
# (CUDA) build that satisfies torch>=2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-core}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
. .venv/bin/activate
pip_q() { python -m pip install --quiet --disable-pip-version-check "$@"; }

if [ "$mode" = "dev" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        need=""
        for pkg in chromium chromium-driver dataset-fashion-mnist; do
            dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
        done
        if [ -n "$need" ]; then
            echo "installing Debian packages:$need" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >/dev/null
            apt-get install -y -qq $need >/dev/null
        fi
    fi
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
            pip_q "torch>=2.3"
        else
            # No GPU: a CPU build. This machine image carries one of 2.13.0 on local disk (pip's
            # find-links); elsewhere PyTorch's CPU index has one (PyPI's Linux wheel is CUDA's).
            wheels="$(mktemp -d)"
            if python -m pip download -qq --no-deps --no-index -d "$wheels" "torch==2.13.0" \
                    2>/dev/null; then
                pip_q "torch==2.13.0"
            else
                pip_q --index-url https://download.pytorch.org/whl/cpu "torch>=2.3" \
                    || pip_q "torch>=2.3"
            fi
            rm -rf "$wheels"
        fi
    fi
    pip_q -e ".[torch,dev]"
else
    pip_q -e .
fi
