#!/usr/bin/env bash
# Create/refresh .venv with torch 2.13.0 (installed first and explicitly: a bare `torch`
# requirement would pull a multi-GB CUDA build), the project (editable) with its dev, ray, triton and
# integrations extras (Lightning, transformers, Accelerate; scripts/constraints.txt keeps torch at
# 2.13.0 while they install), and get the offline default dataset (Debian's
# dataset-fashion-mnist) where this machine allows.
# Idempotent: does nothing when pyproject.toml and the constraints have not changed since the
# last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.nos_sym-installed
want=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -c scripts/constraints.txt torch
    .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[dev,ray,integrations,triton]"
    echo "$want" > "$stamp"
fi

# The offline default dataset: /usr/share/datasets/fashion-mnist (Debian package).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${NOS_DATA:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 ||
            echo "setup: could not apt-get install dataset-fashion-mnist" >&2
    fi
    if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${NOS_OFFLINE:-}" ]; then
        .venv/bin/nos-sym data fetch fashion-mnist ||
            echo "setup: Fashion-MNIST unavailable; searches need it (see README)" >&2
    fi
fi
