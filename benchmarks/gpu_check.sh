#!/usr/bin/env bash
# GPU check (issue 10) for a machine with an NVIDIA GPU. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh
#
# 1. Sets up ./.venv exactly as `make test` does (torch + the package with its test extras); when that
#    torch cannot use the GPU, replaces it by the CUDA build of the same version (from PyPI, whose Linux
#    wheels are CUDA builds; TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cuXYZ picks another).
#    Nothing else is installed. The 1 mm template is downloaded once into .cache/ (nilearn's wheel, as
#    for `make benchmark`; DEEPGMM_CACHE_DIR to reuse a cache).
# 2. Runs the test suite's CUDA-capable tests on the GPU: pytest -m cuda --device cuda.
# 3. Runs the benchmark's three deep inputs (cardiac ROI, MNI 2 mm, MNI 1 mm) with deepSVG on the GPU,
#    then on the CPU as the reference, and prints one table: times, iterations, Dice, GPU memory and the
#    agreement of the GPU labels with the CPU labels (mean Dice between the two maps).
#
# Steps 2 and 3 finish within 5 minutes (GPU_CHECK_SECONDS, default 300; a CPU reference that does not
# fit into what is left is reported as stopped). The first run's installs are not counted (downloading
# a CUDA torch takes a few minutes). Exit status: 0 when the tests passed and every GPU run finished.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_SECONDS:-300}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-120}
TORCH_CUDA_INDEX=${TORCH_CUDA_INDEX:-https://pypi.org/simple}

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'gpu_check: %s\n' "$*" >&2; exit 2; }
cuda_usable() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; }

step "environment: .venv with the test extras (as make test)"
command -v make >/dev/null || fail "make is needed (it sets up .venv as 'make test' does)."
make --no-print-directory .venv/.installed-test

if ! cuda_usable; then
    if ! nvidia-smi >/dev/null 2>&1; then
        fail "no working NVIDIA driver (nvidia-smi missing or failing): this check needs a CUDA GPU."
    fi
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
        fail "torch is a CUDA build but sees no GPU: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES."
    fi
    version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
    step "installing the CUDA build of torch $version from $TORCH_CUDA_INDEX (replaces the CPU build in .venv)"
    "$PY" -m pip uninstall --quiet --yes torch
    "$PY" -m pip install --quiet --index-url "$TORCH_CUDA_INDEX" "torch==$version"
    cuda_usable || fail "torch $version from $TORCH_CUDA_INDEX still sees no GPU: its CUDA may be newer than \
the driver's; set TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cuXYZ for the driver's CUDA version."
fi
"$PY" -c 'import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'

start=$SECONDS
step "CUDA-capable tests on $DEVICE: pytest -m cuda --device $DEVICE (at most ${TEST_SECONDS} s)"
tests=0
timeout "$TEST_SECONDS" "$PY" -m pytest -m cuda --device "$DEVICE" -q -p no:cacheprovider Testing/Python || tests=$?

left=$((BUDGET - (SECONDS - start) - 10))
step "deep inputs on $DEVICE and on the CPU ($left s left of ${BUDGET} s)"
bench=0
"$PY" benchmarks/bench_deep.py --gpu-check "$DEVICE" "$left" || bench=$?

step "done in $((SECONDS - start)) s: tests $([ "$tests" -eq 0 ] && echo passed || echo "FAILED (status $tests)"), \
GPU runs $([ "$bench" -eq 0 ] && echo finished || echo FAILED)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
