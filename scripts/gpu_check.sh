#!/usr/bin/env bash
# The GPU checks of issue 15 as one command for the device machine (an NVIDIA GPU with PyTorch and
# Triton installed, no network; see the device tool's README). It installs what that image lacks
# (lark into /tmp/site; this project as a copy laid out as installed), then runs:
#   1. tests/test_triton_step.py on the GPU (fused=True's compiled kernels against the per-tensor
#      path; the interpreter tests run too),
#   2. benchmarks/bench_step.py --device cuda (100 × 1M fp32 parameters: DSL PowerSign/Adam, their
#      fused kernels, torch's fused Adam and a device copy),
#   3. benchmarks/bench_eval.py --device cuda --skip-cpu (the batched evaluator's `paper`
#      candidates per GPU-hour),
# each under its own time limit, writing the logs and the updated benchmarks/RESULTS.md to $OUT.
#
# Prepare here, once (both folders are git-ignored and travel with `carry`):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl lark==1.3.1
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/
# Then: run(command="bash scripts/gpu_check.sh", carry=[".whl", ".data"], timeout_s=600),
# and merge the sections "bench_step (cuda)" and "bench_eval (cuda)" of $OUT/RESULTS.md into
# benchmarks/RESULTS.md here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit
# the package as installed, without building it (the image's setuptools may predate this
# pyproject): nos_sym with grammar/, controller/ and evaluation/ inside it, run from a copy
work=/tmp/nos_sym_work
rm -rf "$work" && mkdir -p "$work" && cp -r nos_sym tests benchmarks pyproject.toml "$work"/ || exit
for package in grammar controller evaluation; do cp -r "$package" "$work/nos_sym/$package"; done
export PYTHONPATH=/tmp/site NOS_DATA=$PWD/.data NOS_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$work"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" |
    tee -a "$OUT/gpu.txt"
status=0
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_triton_step.py 2>&1 |
    tee "$OUT/test_triton_step.log" || status=1
timeout 120 python3 benchmarks/bench_step.py --device cuda 2>&1 | tee "$OUT/bench_step.log" ||
    status=1
timeout 240 python3 benchmarks/bench_eval.py --device cuda --skip-cpu 2>&1 |
    tee "$OUT/bench_eval.log" || status=1
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit $status
