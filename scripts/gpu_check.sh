#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and PyTorch (TensorFlow optional), run the
# CUDA tests and the bench. Usage: bash scripts/gpu_check.sh  (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
print("torch", torch.__version__, "CUDA available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0))
PY
python -m pytest -q -p no:cacheprovider tests/test_gpu.py
status=$?
python -m bnexplore bench --repeat 5 --no-browser
exit $status
