#!/usr/bin/env bash
# One short run on a lent GPU machine (the device tool's `run`): the benchmarks in --quick form
# and the core tests on the GPU. Writes JSON and logs into $OUT (default: docs/bench).
# Usage, from the repository root:  bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-docs/bench}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi -L 2>&1 | tee "$OUT/gpu_machine.txt"
python3 -c "import jax, optax, flax; print('jax', jax.__version__, 'optax', optax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu_machine.txt"
timeout 240 python3 -m benchmarks.overhead --quick --json "$OUT/overhead_gpu.json" 2>&1 | tee "$OUT/overhead_gpu.log"
timeout 60 python3 -m benchmarks.throughput --quick --data-dir none --models resnet20,resnet18 \
  --json "$OUT/throughput_gpu.json" 2>&1 | tee "$OUT/throughput_gpu.log"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/centralize_test.py tests/alias_test.py \
  2>&1 | tail -n 5 | tee "$OUT/gpu_tests.log"
