#!/usr/bin/env bash
# Issue 5's GPU work in one go, for a lent GPU machine whose python3 holds a CUDA build of torch:
#   1. tests/test_cuda.py: the GPU paths equal the CPU's in float64, and the fused steps queue
#      without synchronising with the host (CUDA's sync debug mode);
#   2. the benchmark's GPU rows: the optimizer step table on GPT-2 124M shapes (fused AdamW
#      baseline), the whole train step in bf16 autocast (tokens/s, peak memory) and the memory table;
#   3. experiments/gpu_diag.py: the fused steps per way of compiling and packing (does packing more
#      pay on a GPU, where the hyper step is bound by its ~1500 kernel launches?), and the eager
#      hyper step per chunk size (time, kernels, peak memory, the host's top functions).
# About 6-7 minutes on an H100 (tests ~2.5, benchmark ~2, diagnosis ~1.5, with compilation). The
# tests run first and fill Inductor's cache: the benchmark after them is also the check that a
# kernel compiled for small tensors is not served to GPT-2's (optimizers.compiled._LayoutKey).
# Each part has its own time limit, and the benchmark writes its report after every phase, so a run
# cut short keeps what it finished. Results go to $OUT (default runs/gpu).
#
#   OUT=runs/gpu HYPERGRAD_GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_check.sh
#
# Then, where the page is made: copy $OUT/bench_step_cuda.json to docs/gpu/bench_step_cuda_h100.json
# and $OUT/gpu_diag.json to docs/gpu/gpu_diag_h100.json (or files named for the card), and rerun the
# CPU report with --gpu-report and --gpu-diag pointing at them (or re-render the page from the last
# CPU report without measuring:
#   python -m experiments.bench_step --render runs/bench_step.json --doc docs/performance.md \
#       --gpu-report docs/gpu/bench_step_cuda_h100.json --gpu-diag docs/gpu/gpu_diag_h100.json \
#       --gpu-note "$(cat docs/gpu/NOTE.txt)"
#   where the note says what changed on the GPU paths since those rows ran; drop it after a rerun).
set -u
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    | tee "$OUT/nvidia_smi.txt"
$PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
echo "tests: $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-360}" $PY -m experiments.bench_step --all --device cuda --models gpt2_124m \
    --memory-model gpt2_124m --tower-model '' --tower-small-model '' --interval-model '' --scaling-sizes '' \
    --kernel-numel 0 --no-progress --out "$OUT/bench_step_cuda.json" 2>&1 | tee "$OUT/bench_step_cuda.log" \
    | grep -v "^USDT"
echo "benchmark: $(( $(date +%s) - start )) s"
start=$(date +%s)  # 3. where the fused steps' time goes (experiments/gpu_diag.py; its profile tables stay in /tmp)
timeout "${DIAG_TIMEOUT:-150}" $PY -m experiments.gpu_diag --variants "${DIAG_VARIANTS:-default,pack=1048576,pack=4194304}" \
    --out /tmp/gpu_diag 2>&1 | tee "$OUT/gpu_diag.log" | grep -v "^USDT"
cp /tmp/gpu_diag/diag.json "$OUT/gpu_diag.json" 2>/dev/null
echo "diagnosis: $(( $(date +%s) - start )) s"
