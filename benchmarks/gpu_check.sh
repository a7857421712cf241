#!/usr/bin/env bash
# The accelerator check, in one script (at most about 5 minutes on one GPU):
#   1. the CUDA tests (tests/test_precision_compile.py: bf16/fp16 autocast, compile, CUDA save/load;
#      tests/test_kernel.py: the compiled (Triton) cascade kernel against the eager one);
#   2. the overhead table on the device in fp32, bf16 and fp16 (GradScaler), with each variant's peak memory;
# results go to benchmarks/results/gpu/ (overhead_<device>.md, cuda_tests_<device>.txt).
#
#   benchmarks/gpu_check.sh                 # on a CUDA machine
#   benchmarks/gpu_check.sh --device cpu    # dry run on the CPU: the same steps, end to end, quick sizes
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE="${2:?--device needs a value}"; fi
PY="${PY:-.venv/bin/python}"
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# On the device: 5 repeats, not the CPU tables' 9 (every repeat runs in this one process there, so the spread
# is the device's own, and 9 would not fit the check's 5 minutes).
QUICK="--repeats 5"
# On the CPU: quick sizes, and every repeat in one process as on a GPU (a child process per repeat would
# compile the cascade kernel again each time: over 15 minutes).
if [ "$DEVICE" = "cpu" ]; then QUICK="--rounds 2 --repeats 3 --steps 1 --in-process"; fi
if [ "$DEVICE" != "cpu" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --device cpu for a dry run')"
fi
echo "== CUDA tests ($DEVICE)"
# On the CPU they skip (no GPU); the run still shows that they are collected and that nothing else fails.
# A failing test does not stop the tables; the script exits with the tests' status at the end.
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/test_precision_compile.py tests/test_kernel.py -m "" -rs > "$OUT/cuda_tests_$DEVICE.txt" 2>&1
TESTS=$?
set -e
tail -5 "$OUT/cuda_tests_$DEVICE.txt"
echo "== overhead and peak memory ($DEVICE; fp32, bf16, fp16)"
"$PY" -m benchmarks.overhead --device "$DEVICE" --precision fp32,bf16,fp16 --memory $QUICK \
  --out "$OUT/overhead_$DEVICE.md" | tail -3
echo "written: $OUT/cuda_tests_$DEVICE.txt $OUT/overhead_$DEVICE.md"
exit $TESTS
